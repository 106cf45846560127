//! The tonic example: a real tonic client calls a gRPC service behind the layer until it gets
//! `RESOURCE_EXHAUSTED`.
#![cfg(feature = "tonic")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_tonic_client_sees_resource_exhausted_once_the_budget_is_spent() {
    let mut child = Command::new(common::example_bin("tonic"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("the tonic example did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // Four calls of 26 tokens fit in 100 (the fourth starts at 22 left), the fifth does not.
    assert!(
        stdout.contains("call 4: OK, 22 tokens were left"),
        "{stdout}"
    );
    assert!(stdout.contains("call 5: ResourceExhausted"), "{stdout}");
}
