//! The overflow rule on real sockets (docs/protocol.md, 6.10): a path that loses
//! runs of datagrams, as a drop-tail queue overflowing does, shows the ranks loss
//! bursts; the bench row counts them (`overflows`) while the rule is on, and
//! `--overflow-hold-ms 0` turns it off. The rule moves windows, never sums.

mod common;

use common::bench_row;

/// `inagg bench --codec i32` of two ranks behind its relay dropping 15% of the
/// datagrams each way (a quarter of the chunks lose a contribution or a result,
/// more than the fifth of a round that makes a burst), with `extra` flags: the row.
fn bench_losing_bursts(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--workers", "2", "--elements", "65536", "--codec", "i32"];
    args.extend([
        "--iters",
        "1",
        "--chunk-elements",
        "512",
        "--loss",
        "0.15",
        "--json",
    ]);
    args.extend(extra);
    bench_row(&args)
}

#[test]
fn loss_bursts_are_counted_while_the_overflow_rule_is_on_and_change_no_sum() {
    let on = bench_losing_bursts(&[]);
    assert!(on["overflows"].as_u64().expect("overflows") > 0, "{on}");
    assert!(
        on["retransmissions"].as_u64().expect("retransmissions") > 0,
        "{on}"
    );
    let off = bench_losing_bursts(&["--overflow-hold-ms", "0"]);
    assert_eq!(off["overflows"], 0, "{off}");
    for r in [&on, &off] {
        assert_eq!(r["within_bound"], true, "{r}");
        assert_eq!(r["ranks_identical"], true, "{r}");
    }
    assert_eq!(on["result_checksum"], off["result_checksum"]);
}
