//! logchannel's tests, in one binary so that the helpers are shared.

mod decode_any;
mod errors;
mod json;
mod props;
mod sizes;
mod support;
