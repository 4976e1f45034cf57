//! The operator binary's allocator settings are in effect (`src/main.rs`): jemalloc reports
//! its options when asked to print its statistics at exit.

#[cfg(not(target_env = "msvc"))]
#[test]
fn freed_pages_go_back_to_the_system_after_one_second() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("crd")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .expect("the portcullis binary runs");
    assert!(out.status.success(), "portcullis crd failed");
    let stats = String::from_utf8_lossy(&out.stderr);
    assert!(
        stats.contains("opt.stats_print: true"),
        "jemalloc printed no statistics: is it the binary's allocator?\n{stats}"
    );
    assert!(
        stats.contains("opt.dirty_decay_ms: 1000 "),
        "the binary's jemalloc options are not in effect:\n{stats}"
    );
}
