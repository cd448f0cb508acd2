//! Arbitrary bytes as a sequence of packets, control messages and clock steps fed to an
//! aggregator with a running job: it never panics and never sends garbage.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    std::hint::black_box(inagg_proto::fuzzing::aggregator(data));
});
