//! Finding (and first building) the `relay-server` and `relay-client`
//! executables that are measured. See the crate documentation.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::Context;

const BUILD_HINT: &str = "cargo build --release -p relay-server -p relay-client --bins";

/// The executables under test.
pub struct Binaries {
    pub relay_server: PathBuf,
    pub relay_client: PathBuf,
}

/// With `bin_dir`, the binaries in it as they are; without, the ones an
/// up-to-date `cargo build --release` of this workspace produces.
pub fn locate(bin_dir: Option<&Path>) -> anyhow::Result<Binaries> {
    match bin_dir {
        Some(dir) => in_dir(dir),
        None => build(),
    }
}

fn exe(name: &str) -> String {
    format!("{name}{}", std::env::consts::EXE_SUFFIX)
}

fn in_dir(dir: &Path) -> anyhow::Result<Binaries> {
    let binaries = Binaries {
        relay_server: dir.join(exe("relay-server")),
        relay_client: dir.join(exe("relay-client")),
    };
    for path in [&binaries.relay_server, &binaries.relay_client] {
        anyhow::ensure!(
            path.is_file(),
            "{} is missing: build it with `{BUILD_HINT}`, or leave out --bin-dir and the benchmark builds it",
            path.display()
        );
    }
    Ok(binaries)
}

fn build() -> anyhow::Result<Binaries> {
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO")));
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("Cargo.toml");
    anyhow::ensure!(
        manifest.is_file(),
        "the workspace manifest {} is gone; pass --bin-dir with binaries built by `{BUILD_HINT}`",
        manifest.display()
    );
    eprintln!("building the binaries under test: {BUILD_HINT}");
    let output = std::process::Command::new(&cargo)
        .args(["build", "--release", "--manifest-path"])
        .arg(&manifest)
        .args(["-p", "relay-server", "-p", "relay-client", "--bins"])
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", cargo.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "`{BUILD_HINT}` failed ({}); see cargo's messages above",
        output.status
    );

    let (mut relay_server, mut relay_client) = (None, None);
    for line in output.stdout.split(|b| *b == b'\n') {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        match message["target"]["name"].as_str() {
            Some("relay-server") => relay_server = Some(PathBuf::from(executable)),
            Some("relay-client") => relay_client = Some(PathBuf::from(executable)),
            _ => {}
        }
    }
    let missing = |name: &str| anyhow::anyhow!("cargo built no `{name}` executable");
    Ok(Binaries {
        relay_server: relay_server.ok_or_else(|| missing("relay-server"))?,
        relay_client: relay_client.ok_or_else(|| missing("relay-client"))?,
    })
}
