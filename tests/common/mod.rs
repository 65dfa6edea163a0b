//! The integration-test harness as benches/pop3_bench.rs includes it (by
//! `#[path]`): the harness itself lives in tests/it/common/. Once the
//! benchmark names that path, this file can go.

// The benchmark uses a few of the harness's helpers; the integration tests
// (tests/it) use all of them and are where unused ones are caught.
#![allow(dead_code)]

#[path = "../it/common/mod.rs"]
mod harness;

pub use harness::*;
