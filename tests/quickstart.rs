//! `cargo run --example quickstart` works with nothing installed and exits 0.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn quickstart_runs_to_a_429_and_exits_zero() {
    let start = Instant::now();
    let mut child = Command::new(common::example_bin("quickstart"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("quickstart did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{stdout}", out.status);
    assert!(stdout.contains("  200  "), "{stdout}");
    assert!(stdout.contains("  429  "), "{stdout}");
    assert!(stdout.contains("rate_limit_exceeded"), "{stdout}");
}
