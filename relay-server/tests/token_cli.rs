//! The `relay-server token` commands, run as the built binary the way an
//! operator runs them. (Also makes `cargo test --workspace` build the
//! `relay-server` binary that the agent's end-to-end tests launch.)

use std::process::{Command, Output};

fn relay_server(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relay-server"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("HOOKRELAY_DATA_DIR")
        .env_remove("HOOKRELAY_CONFIG")
        .output()
        .expect("relay-server runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn create_prints_only_the_token_and_stores_only_a_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path");
    let out = relay_server(&[
        "token",
        "create",
        "--data-dir",
        data,
        "--name",
        "alice",
        "--tunnels",
        "alice-*",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the token on stdout: {stdout:?}");
    let token = lines[0];
    assert!(token.starts_with("hkr_"), "{token}");
    // At least 128 bits of randomness: 40 hex digits = 160 bits.
    assert!(token.len() >= 4 + 32, "{token}");

    let stored = std::fs::read_to_string(dir.path().join("tokens.json")).expect("tokens.json");
    assert!(
        !stored.contains(token),
        "the token itself must not be stored"
    );
    assert!(!stored.contains(&token[4..]), "nor its random part");

    // A second token with the same name is refused, and the first one stays.
    let again = relay_server(&[
        "token",
        "create",
        "--data-dir",
        data,
        "--name",
        "alice",
        "--tunnels",
        "x",
    ]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );

    let list = relay_server(&["token", "list", "--data-dir", data, "--json"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json list");
    assert_eq!(json[0]["name"], "alice");
    assert_eq!(json[0]["tunnels"][0], "alice-*");
    assert!(!text(&list.stdout).contains(token));

    let revoke = relay_server(&["token", "revoke", "--data-dir", data, "alice"]);
    assert!(revoke.status.success(), "{}", text(&revoke.stderr));
    let list = relay_server(&["token", "list", "--data-dir", data, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json list");
    assert_eq!(json.as_array().map(Vec::len), Some(0));

    let missing = relay_server(&["token", "revoke", "--data-dir", data, "alice"]);
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("no token named"));
}

#[test]
fn invalid_tunnel_pattern_is_refused_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path");
    let out = relay_server(&[
        "token",
        "create",
        "--data-dir",
        data,
        "--name",
        "bob",
        "--tunnels",
        "Not A Label!",
    ]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("Not A Label!"), "{stderr}");
}
