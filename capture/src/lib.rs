//! tapstream: packet capture from XDP through AF_XDP rings to PCAP chunks, compressed and
//! streamed to object storage.
//!
//! A frame's path reads in the module names, top to bottom:
//! [`filter`] (tcpdump filters, compiled for the kernel) ->
//! [`datapath`] (the XDP program, AF_XDP rings, one writer thread per queue, PCAP chunks) ->
//! [`captures`] (each capture's output) ->
//! [`store`] (zstd frames, objects, multipart streams, the spool, S3 and local directories).
//!
//! A request's path: [`cli`], a broker's message in [`fleet`], or the HTTP API in [`control`] ->
//! [`request`] (one capture request, resolved into a plan) ->
//! [`control`] (the daemon's registry of captures) -> [`captures`] -> events.
//! Beside them: [`config`], [`metrics`] and [`sys`] (every system call outside the rings and
//! libpcap, and the [`sys::Shutdown`] every stage that must stop with the process is given).

pub mod captures;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod filter;
pub mod fleet;
pub mod metrics;
pub mod report;
pub mod request;
pub mod store;
pub mod sys;

/// The stages from the top down, as the README's layout section lists them: a module may use
/// the stages below its own, never one above, nor one beside it on the same level.
#[cfg(test)]
const LAYERS: &[&[&str]] = &[
    &["main"],
    &["cli"],
    &["fleet"],
    &["control"],
    &["request"],
    &["config"],
    &["captures"],
    &["store"],
    &["datapath"],
    &["filter"],
    &["metrics", "report", "sys"],
];

#[cfg(test)]
mod layout {
    use std::path::{Path, PathBuf};

    use super::LAYERS;

    /// Every `.rs` file under `dir`.
    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The top-level modules of this crate that `code` names: `crate::NAME` paths, and the
    /// first names of `use crate::{...}` groups.
    fn named_modules(code: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Names at depth 0 of the group.
                let (mut depth, mut word, mut expect_name) = (0usize, String::new(), true);
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => expect_name = true,
                        c if depth == 0 && expect_name && (c.is_alphanumeric() || c == '_') => word.push(c),
                        _ if !word.is_empty() => {
                            names.push(std::mem::take(&mut word));
                            expect_name = false;
                        }
                        _ => {}
                    }
                }
            } else {
                names.push(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
            }
        }
        names
    }

    fn layer_of(stage: &str) -> usize {
        LAYERS.iter().position(|l| l.contains(&stage)).unwrap_or_else(|| panic!("{stage} is in no layer"))
    }

    /// No module uses one of a stage above its own (`cargo test -p tapstream --lib layout`).
    #[test]
    fn no_module_imports_from_a_stage_above_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut upward = Vec::new();
        for file in &files {
            let relative = file.strip_prefix(&src).unwrap();
            let first = relative.components().next().unwrap().as_os_str().to_str().unwrap();
            let stage = first.trim_end_matches(".rs");
            if stage == "lib" {
                continue;
            }
            let code: String = std::fs::read_to_string(file)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let names = if stage == "main" {
                // The binary names the library as `tapstream::`.
                named_modules(&code.replace("tapstream::", "crate::"))
            } else {
                named_modules(&code)
            };
            for name in names {
                if name != stage && layer_of(&name) <= layer_of(stage) {
                    upward.push(format!("{} uses {name}", relative.display()));
                }
            }
        }
        upward.sort();
        upward.dedup();
        assert!(upward.is_empty(), "imports from a stage above or beside: {upward:#?}");
        assert!(files.len() > 40, "only {} sources found", files.len());
    }
}
