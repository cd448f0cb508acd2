//! Arbitrary bytes as a sequence of datagrams from the aggregator's address (grants,
//! results, errors, echoes, garbage), clock steps and allreduces fed to a worker: it
//! never panics, never sends garbage and counts what it drops.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    std::hint::black_box(inagg_proto::fuzzing::worker(data));
});
