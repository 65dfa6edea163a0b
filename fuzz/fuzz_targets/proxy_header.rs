//! The PROXY protocol header: the first bytes a load balancer (or anybody
//! on a trusted network) sends, read before anything else. popbridge parses
//! it with the `ppp` crate behind `server::proxy::parse`.
//!
//! Properties:
//! - nothing panics;
//! - a header is never longer than the input, nor than the spec allows
//!   (v1 107 octets, v2 `V2_MAX`);
//! - the answer does not depend on how the bytes arrived: every prefix of
//!   an accepted header asks for more bytes, and bytes after a header do
//!   not change it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popbridge::server::proxy::{parse, V1_MAX, V2_MAX};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((header, len))) = parse(data) else {
        return;
    };
    assert!(len <= data.len());
    assert!(len <= V1_MAX.max(V2_MAX));
    assert_eq!(parse(&data[..len]), Ok(Some((header, len))));
    for cut in 0..len {
        assert_eq!(parse(&data[..cut]), Ok(None), "prefix of {cut} octets");
    }
});
