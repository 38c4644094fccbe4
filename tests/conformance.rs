//! Every committed framework trajectory and schedule, replayed on the CPU engine, must agree to
//! 1e-6 + 1e-5·|expected| (NaN where the framework produced NaN).

use std::collections::BTreeMap;

mod harness;

use fusedopt::Device;
use harness::{compare, replay};

#[test]
fn every_committed_case_agrees_on_cpu() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance");
    let mut per_flavor: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for sub in ["optimizers", "schedules"] {
        let mut paths: Vec<_> = std::fs::read_dir(root.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        for path in paths {
            let case: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let flavor = case["flavor"].as_str().unwrap().to_string();
            *per_flavor.entry(format!("{flavor} {sub}")).or_default() += 1;
            match replay(&case, Device::Cpu).and_then(|r| compare(&case, &r)) {
                Ok(worst) if worst <= 1.0 => {}
                Ok(worst) => failures.push(format!("{}: {worst:.2}× tolerance", path.display())),
                Err(e) => failures.push(format!("{}: {e}", path.display())),
            }
        }
    }
    println!("cases replayed: {per_flavor:?}");
    for flavor in ["pytorch", "keras", "optax", "tf1"] {
        assert!(
            per_flavor[&format!("{flavor} optimizers")] >= 30,
            "{flavor}: too few cases"
        );
    }
    assert!(
        failures.is_empty(),
        "{} cases disagree:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
