//! libvirt's rule, checked on the real dependency graph (`cargo metadata`): a hypervisor
//! driver depends only on the public API (`virt`), the shared utilities (`virt-util`), the
//! domain XML (`virt-conf`) and external crates; never on another driver, never on the VMM's
//! crates (`tern-vmm`, `tern-migration`, `tern`, `tern-guest`).

use std::collections::HashMap;
use std::process::Command;

use serde_json::Value;

const DRIVERS: &[&str] = &["virt-driver-tern", "virt-driver-qemu"];
const ALLOWED_WORKSPACE_DEPS: &[&str] = &["virt", "virt-util", "virt-conf"];

/// Workspace packages and their normal dependencies that are workspace members too.
fn workspace_deps() -> HashMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: Value = serde_json::from_slice(&o.stdout).expect("metadata JSON");
    let pkgs = m["packages"].as_array().expect("packages");
    let members: Vec<String> = pkgs
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    pkgs.iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["kind"].is_null())
                .filter_map(|d| d["name"].as_str().map(str::to_string))
                .filter(|n| members.contains(n))
                .collect();
            (p["name"].as_str().unwrap_or("").to_string(), deps)
        })
        .collect()
}

/// Every workspace crate `name` reaches through normal dependencies.
fn closure(g: &HashMap<String, Vec<String>>, name: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut todo = vec![name.to_string()];
    while let Some(n) = todo.pop() {
        for d in g.get(&n).into_iter().flatten() {
            if !seen.contains(d) {
                seen.push(d.clone());
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn drivers_depend_only_on_the_api_util_and_conf() {
    let g = workspace_deps();
    for drv in DRIVERS {
        let direct = g
            .get(*drv)
            .unwrap_or_else(|| panic!("{drv} is not in the workspace"));
        for d in direct {
            assert!(
                ALLOWED_WORKSPACE_DEPS.contains(&d.as_str()),
                "{drv} depends on {d}: a driver may depend only on {ALLOWED_WORKSPACE_DEPS:?} and external crates"
            );
        }
        let all = closure(&g, drv);
        for bad in DRIVERS
            .iter()
            .chain(&["tern-vmm", "tern-migration", "tern", "tern-guest"])
        {
            assert!(
                !all.iter().any(|d| d == bad),
                "{drv} reaches {bad} (through {all:?})"
            );
        }
    }
    // The API, conf and util never reach a driver or the VMM either.
    for base in ALLOWED_WORKSPACE_DEPS {
        let all = closure(&g, base);
        for bad in DRIVERS
            .iter()
            .chain(&["tern-vmm", "tern-migration", "tern"])
        {
            assert!(!all.iter().any(|d| d == bad), "{base} reaches {bad}");
        }
    }
}

#[test]
fn the_check_fails_on_a_driver_to_driver_dependency() {
    let mut g = workspace_deps();
    g.get_mut("virt-driver-qemu")
        .expect("qemu driver")
        .push("virt-driver-tern".into());
    let all = closure(&g, "virt-driver-qemu");
    assert!(all.iter().any(|d| d == "virt-driver-tern"));
}
