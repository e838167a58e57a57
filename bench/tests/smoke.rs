//! A CI-sized run of `hookrelay-bench http` against the debug binaries the
//! test suite builds: workloads a and c for two seconds each. It fails only on
//! gross regressions (CI machines are noisy and these are debug builds): any
//! request not answered 200, throughput collapsing to a trickle, a latency of
//! seconds, or memory far beyond the release targets. The release figures and
//! their targets are in the README ("Benchmarks").

use std::{path::PathBuf, process::Command, time::Duration};

fn bench_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hookrelay-bench"))
}

#[test]
fn http_workloads_pass_through_the_tunnel_without_gross_regressions() {
    let exe = bench_exe();
    let bin_dir = exe.parent().expect("the bench binary has a directory");
    for name in ["relay-server", "relay-client"] {
        assert!(
            bin_dir.join(name).is_file(),
            "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
            bin_dir.join(name).display()
        );
    }
    let started = std::time::Instant::now();
    let out = Command::new(&exe)
        .arg("--bin-dir")
        .arg(bin_dir)
        .args([
            "--json",
            "http",
            "--workloads",
            "a,c",
            "--duration",
            "2",
            "--warmup",
            "0",
        ])
        .output()
        .expect("hookrelay-bench runs");
    assert!(
        out.status.success(),
        "hookrelay-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the smoke run took {:?}",
        started.elapsed()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let workloads = report["workloads"].as_array().expect("workloads");
    assert_eq!(workloads.len(), 2, "{report}");
    for w in workloads {
        let name = w["workload"].as_str().unwrap_or("?");
        for t in w["targets"].as_array().expect("targets") {
            let target = t["target"].as_str().unwrap_or("?");
            assert_eq!(t["failures"], 0, "workload {name} via {target}: {t}");
            let rps = t["req_per_s"].as_f64().unwrap_or(0.0);
            assert!(rps >= 20.0, "workload {name} via {target}: {rps} req/s");
            let p99 = t["p99_ms"].as_f64().unwrap_or(f64::MAX);
            assert!(p99 < 2000.0, "workload {name} via {target}: p99 {p99} ms");
        }
        let via = &w["targets"][1];
        assert_eq!(via["target"], "hookrelay");
        let ratio = via["ratio_to_direct"].as_f64().unwrap_or(0.0);
        assert!(ratio >= 0.003, "workload {name}: ratio {ratio} to direct");
        for process in ["relay", "agent"] {
            let mib = via["peak_rss_mib"][process].as_f64().unwrap_or(f64::MAX);
            assert!(
                mib < 512.0,
                "workload {name}: {process} peaked at {mib} MiB"
            );
        }
    }
}
