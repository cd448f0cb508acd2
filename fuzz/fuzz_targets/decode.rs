//! Arbitrary bytes as a datagram: decode never panics and accepts only canonical bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    std::hint::black_box(inagg_proto::fuzzing::decode(data));
});
