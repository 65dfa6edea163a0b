//! The `[oauth]` section: providers and the token store.

use serde::{Deserialize, Serialize};

/// OAuth2 providers and where tokens are kept.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OauthConfig {}
