//! `crds/` must be exactly what `tether crd` prints, so a changed Rust type cannot ship with a
//! stale CRD.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let generated = tether::operator::crd::yaml_documents().expect("serialising the CRDs");
    let mut committed_names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    committed_names.sort();
    assert_eq!(
        committed_names,
        tether::operator::crd::FILES,
        "crds/ should hold one file per CRD; regenerate with `scripts/gen-crds`"
    );
    for (file, yaml) in tether::operator::crd::FILES.iter().zip(&generated) {
        let committed = std::fs::read_to_string(dir.join(file)).expect("reading a CRD file");
        assert!(
            committed == *yaml,
            "crds/{file} is stale: run `scripts/gen-crds` (or `cargo run -- crd` and split it \
             per CRD into crds/) and commit the result"
        );
    }
    let all = tether::operator::crds_yaml().expect("tether crd output");
    let concatenated: String = generated.concat();
    assert_eq!(
        all, concatenated,
        "`tether crd` must equal `cat crds/*.yaml`"
    );
}

/// The Helm chart installs and upgrades the CRDs from its own copy (charts/tether/files/crds/,
/// read with `.Files.Get`); it must be byte-identical to `crds/`.
#[test]
fn chart_crds_match_crds_dir() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chart = root.join("charts/tether/files/crds");
    let mut names: Vec<String> = std::fs::read_dir(&chart)
        .unwrap_or_else(|e| panic!("reading {}: {e}", chart.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        tether::operator::crd::FILES,
        "charts/tether/files/crds/ should hold exactly the files of crds/; run `scripts/gen-crds`"
    );
    for file in tether::operator::crd::FILES {
        let ours = std::fs::read(root.join("crds").join(file)).expect("reading crds/");
        let chart_copy = std::fs::read(chart.join(file)).expect("reading the chart's copy");
        assert!(
            ours == chart_copy,
            "charts/tether/files/crds/{file} differs from crds/{file}: run `scripts/gen-crds` \
             and commit both"
        );
    }
}
