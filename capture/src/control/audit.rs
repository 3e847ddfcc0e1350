//! The audit log: one JSON line per start, refusal, stop, wait and read, saying who asked
//! (the [`Subject`]: uid and groups, the rule of a token, a broker and its message id), what
//! was asked, what was decided and why.
//!
//! Each line is written whole and synced to disk (`fdatasync`) before the request is
//! answered, so what was answered is on disk if the daemon dies right after. Past
//! `audit.max_bytes` the file is renamed `<path>.1` (the older ones moving to `.2`...,
//! `audit.keep` of them kept) and a new one begun. A line never holds a secret: a token is
//! known by its rule's name, and requests hold none.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::Serialize;

use crate::request::{CaptureRequest, access::Subject};

/// Errors opening the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Start a capture.
    Start,
    /// Stop one.
    Stop,
    /// Wait for one to end.
    Wait,
    /// See one.
    Read,
    /// List the captures.
    List,
}

/// One line of the log.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub action: Action,
    pub subject: &'a Subject,
    /// The access rule the subject was held to; `null`: none (anything allowed, or nothing).
    pub rule: Option<&'a str>,
    /// The capture acted on (for a start: its id, once known).
    pub capture: Option<&'a str>,
    /// What a start asked, as it was asked.
    pub request: Option<&'a CaptureRequest>,
    /// `allowed` or `refused`.
    pub decision: &'static str,
    /// Why it was refused, or failed.
    pub reason: Option<String>,
}

/// The open log.
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    /// The file and its size.
    file: Mutex<(File, u64)>,
}

impl AuditLog {
    /// Opens (appends to) the log at `path`, readable by its owner and group only.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> Result<Self, AuditError> {
        let err = |source| AuditError::Open { path: path.to_owned(), source };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let file = open_append(path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        Ok(Self { path: path.to_owned(), max_bytes, keep, file: Mutex::new((file, size)) })
    }

    /// Where it is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` and syncs it to disk; rotates the file first if the line would take it
    /// past its size. A failure is logged (the request is answered all the same).
    pub fn write(&self, record: &Record<'_>) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                log::error!("audit: cannot encode a record: {e}");
                metrics::counter!(crate::metrics::AUDIT_ERRORS).increment(1);
                return;
            }
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if file.1 > 0 && file.1 + line.len() as u64 > self.max_bytes {
            match self.rotate() {
                Ok(new) => *file = (new, 0),
                Err(e) => log::error!("audit: cannot rotate {}: {e}", self.path.display()),
            }
        }
        let result = file.0.write_all(&line).and_then(|()| file.0.sync_data());
        match result {
            Ok(()) => {
                file.1 += line.len() as u64;
                metrics::counter!(crate::metrics::AUDIT_LINES, "decision" => record.decision).increment(1);
            }
            Err(e) => {
                log::error!("audit: cannot write to {}: {e}", self.path.display());
                metrics::counter!(crate::metrics::AUDIT_ERRORS).increment(1);
            }
        }
    }

    /// Renames the file `.1` (and each older one up a number, the last beyond `keep` gone),
    /// syncs the directory, and opens a new file.
    fn rotate(&self) -> std::io::Result<File> {
        let numbered = |n: usize| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        let _ = std::fs::remove_file(numbered(self.keep));
        for n in (1..self.keep).rev() {
            match std::fs::rename(numbered(n), numbered(n + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        let file = open_append(&self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(file)
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// Now, as the log writes it.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(subject: &'a Subject, capture: &'a str) -> Record<'a> {
        Record {
            time: now(),
            action: Action::Stop,
            subject,
            rule: Some("team-a"),
            capture: Some(capture),
            request: None,
            decision: "allowed",
            reason: None,
        }
    }

    #[test]
    fn lines_are_json_and_the_file_rotates_at_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, 4096, 2).unwrap();
        let subject = Subject::Local { uid: Some(1000), gid: Some(1000), groups: vec![] };
        for i in 0..100 {
            log.write(&record(&subject, &format!("capture-{i:03}")));
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let (now, one, two) =
            (read(&path), read(&dir.path().join("audit.jsonl.1")), read(&dir.path().join("audit.jsonl.2")));
        assert!(!dir.path().join("audit.jsonl.3").exists(), "only `keep` rotated files");
        for text in [&now, &one, &two] {
            assert!(!text.is_empty() && text.len() <= 4096, "{}", text.len());
            for line in text.lines() {
                let value: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(value["subject"]["uid"], 1000);
                assert_eq!(value["decision"], "allowed");
            }
        }
        assert!(
            now.ends_with(
                "\"capture\":\"capture-099\",\"request\":null,\"decision\":\"allowed\",\"reason\":null}\n"
            ),
            "{now}"
        );
        // The newest lines are in the file, the ones before in .1, then .2, in order.
        let all: Vec<String> = [&two, &one, &now].iter().flat_map(|t| t.lines().map(str::to_owned)).collect();
        let ids: Vec<u64> = all
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["capture"].as_str().unwrap()[8..]
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1) && *ids.last().unwrap() == 99, "{ids:?}");
        // Reopened, it appends.
        drop(log);
        let log = AuditLog::open(&path, 4096, 2).unwrap();
        log.write(&record(&subject, "after"));
        let after = read(&path);
        assert!(after.lines().last().unwrap().contains("\"after\""), "{after}");
        assert!(
            after.starts_with(&now) || read(&dir.path().join("audit.jsonl.1")) == now,
            "appended, or rotated"
        );
    }
}
