//! docs/cli.md is what `inagg cli-reference` prints: the reference cannot drift from
//! the flags and defaults in the code.

mod common;

#[test]
fn docs_cli_md_is_the_generated_reference() {
    let out = common::inagg()
        .arg("cli-reference")
        .output()
        .expect("run inagg cli-reference");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).expect("UTF-8");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cli.md");
    let committed = std::fs::read_to_string(path).expect("read docs/cli.md");
    // Every visible command is in it, each flag with its default.
    for cmd in [
        "aggregator",
        "worker",
        "bench",
        "demo",
        "sweep",
        "relay",
        "simulate",
    ] {
        assert!(
            generated.contains(&format!("## `inagg {cmd}`")),
            "{cmd} missing"
        );
    }
    assert!(generated.contains("`--elements ELEMENTS`"), "flags missing");
    if generated != committed {
        let line = generated
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "its length".to_string(), |n| format!("line {}", n + 1));
        panic!(
            "docs/cli.md differs from `inagg cli-reference` (first at {line}); \
             regenerate it: cargo run --release -- cli-reference > docs/cli.md"
        );
    }
}
