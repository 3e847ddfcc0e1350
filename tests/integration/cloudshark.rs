//! Captures sent to CloudShark. CloudShark does not run here: a strict stand-in implements
//! its documented upload endpoint (`POST /api/v1/<token>/upload`, a multipart form with the
//! `file` part and the `filename`, `additional_tags` and `description` fields, the JSON
//! answers), in the daemon's namespace. The file it receives is compared byte for byte with
//! the capture the daemon stored in its local store.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use tapstream::{
    control::{CaptureInfo, CaptureState},
    request::CaptureRequest,
    store::cloudshark::CloudSharkSummary,
};
use tapstream_testenv::{Sender, VethPair};

use crate::{
    common::eventually,
    daemon::{TestDaemon, sendable},
};

const TOKEN: &str = "5e1ec7ab1e0123456789abcdef";

/// One file the stand-in took.
#[derive(Clone, Debug)]
struct Received {
    /// The `filename` field, and the file part's own file name.
    filename: String,
    part_filename: String,
    tags: Vec<String>,
    description: String,
    file: Vec<u8>,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Requests refused as malformed (never expected): what was wrong.
    malformed: Vec<String>,
    /// Requests with a wrong token.
    wrong_token: usize,
    /// Whether it hangs: each request is answered 503 after 3 s, and nothing is stored.
    hang: bool,
}

/// The CloudShark stand-in: a hyper server on 127.0.0.1 of a namespace, which can be taken
/// down and brought back on the same port.
struct CloudSharkServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    runtime: tokio::runtime::Runtime,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl CloudSharkServer {
    /// Listens in `veth`'s capture namespace (where the daemon runs).
    fn start(veth: &VethPair) -> Self {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = veth.capture_ns.enter(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let addr = listener.local_addr().unwrap();
        let mut server = Self { addr, state: Arc::default(), runtime, accept: None };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let state = self.state.clone();
        let _guard = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        self.accept = Some(self.runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }

    /// Stops accepting: connections are refused.
    fn down(&mut self) {
        if let Some(task) = self.accept.take() {
            task.abort();
            let _ = self.runtime.block_on(task);
        }
    }

    /// Accepts again, on the same port.
    fn up(&mut self, veth: &VethPair) {
        let addr = self.addr;
        let listener = veth.capture_ns.enter(|| std::net::TcpListener::bind(addr).unwrap());
        self.serve(listener);
    }

    fn url(&self) -> String {
        format!("cloudshark+http://{}", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        let state = self.state.lock().unwrap();
        assert!(state.malformed.is_empty(), "malformed uploads: {:?}", state.malformed);
        state.received.clone()
    }

    fn hang(&self, hang: bool) {
        self.state.lock().unwrap().hang = hang;
    }
}

fn json(status: u16, value: serde_json::Value) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap()
}

/// CloudShark's answers: 200 with the new file's id, 401 for a wrong token, 404 elsewhere,
/// 400 for a form that is not what the API documents.
async fn answer(
    state: &Mutex<State>,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    if state.lock().unwrap().hang {
        tokio::time::sleep(Duration::from_secs(3)).await;
        return json(503, serde_json::json!({"status": 503, "exceptions": ["Service unavailable"]}));
    }
    let path = request.uri().path().to_owned();
    let token = path.strip_prefix("/api/v1/").and_then(|p| p.strip_suffix("/upload"));
    let (Some(token), true) = (token, request.method() == hyper::Method::POST) else {
        return json(404, serde_json::json!({"status": 404, "exceptions": ["Not found"]}));
    };
    if token != TOKEN {
        state.lock().unwrap().wrong_token += 1;
        return json(
            401,
            serde_json::json!({"status": 401, "exceptions": ["API Token is missing or invalid"]}),
        );
    }
    let content_type =
        request.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    match parse_form(&content_type, &body) {
        Ok(received) => {
            let mut state = state.lock().unwrap();
            state.received.push(received.clone());
            let id = format!("{:06x}", 0xc5_0000 + state.received.len());
            json(200, serde_json::json!({"filename": received.filename, "id": id}))
        }
        Err(why) => {
            state.lock().unwrap().malformed.push(why.clone());
            json(400, serde_json::json!({"status": 400, "exceptions": [why]}))
        }
    }
}

/// A `multipart/form-data` body with the fields CloudShark's upload documents, parsed strictly.
fn parse_form(content_type: &str, body: &[u8]) -> Result<Received, String> {
    let boundary = content_type
        .strip_prefix("multipart/form-data; boundary=")
        .ok_or_else(|| format!("content type {content_type:?} is not multipart/form-data with a boundary"))?;
    let delimiter = format!("--{boundary}").into_bytes();
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay[from..].windows(needle.len()).position(|w| w == needle).map(|p| p + from)
    };
    let mut at =
        find(body, &delimiter, 0).filter(|&p| p == 0).ok_or("the body does not start with the boundary")?;
    let mut fields: BTreeMap<String, (Option<String>, Vec<u8>)> = BTreeMap::new();
    loop {
        at += delimiter.len();
        if body[at..].starts_with(b"--\r\n") && at + 4 == body.len() {
            break;
        }
        if !body[at..].starts_with(b"\r\n") {
            return Err("a boundary is not followed by CRLF".into());
        }
        at += 2;
        let head_end = find(body, b"\r\n\r\n", at).ok_or("a part without headers")?;
        let head = std::str::from_utf8(&body[at..head_end]).map_err(|_| "headers not UTF-8")?;
        let mut crlf_delimiter = b"\r\n".to_vec();
        crlf_delimiter.extend_from_slice(&delimiter);
        let next = find(body, &crlf_delimiter, head_end + 4).ok_or("a part without a closing boundary")?;
        let content = body[head_end + 4..next].to_vec();
        let disposition = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Disposition: form-data; "))
            .ok_or_else(|| format!("a part without form-data disposition: {head:?}"))?;
        let param = |key: &str| {
            disposition
                .split("; ")
                .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")).and_then(|v| v.strip_suffix('"')))
                .map(str::to_owned)
        };
        let name = param("name").ok_or("a part without a name")?;
        if !["file", "filename", "additional_tags", "description"].contains(&name.as_str()) {
            return Err(format!("field {name:?} is not one of the upload's"));
        }
        if fields.insert(name.clone(), (param("filename"), content)).is_some() {
            return Err(format!("field {name:?} twice"));
        }
        at = next + 2;
    }
    let (part_filename, file) = fields.remove("file").ok_or("no file part")?;
    let text = |fields: &mut BTreeMap<String, (Option<String>, Vec<u8>)>, name: &str| {
        fields.remove(name).map(|(_, v)| String::from_utf8(v).unwrap()).unwrap_or_default()
    };
    Ok(Received {
        part_filename: part_filename.ok_or("the file part has no file name")?,
        filename: text(&mut fields, "filename"),
        tags: text(&mut fields, "additional_tags").split(',').map(str::to_owned).collect(),
        description: text(&mut fields, "description"),
        file,
    })
}

/// A daemon with the appliance `[cloudshark.lab]` at `url`, whose token file holds `token`,
/// and `extra` lines in its section.
fn daemon(veth: &VethPair, url: &str, token: &str, extra: &str) -> (TestDaemon, tempfile::TempDir) {
    let (section, secrets) = appliance(url, token, extra);
    (TestDaemon::start(veth, &section), secrets)
}

/// The daemon's lines for `[cloudshark.lab]` at `url`, its token in a file of the directory
/// returned, and its metrics at 127.0.0.1:9464.
fn appliance(url: &str, token: &str, extra: &str) -> (String, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt as _;
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("cloudshark-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The daemon's metrics (in [daemon]), then the appliance.
    let section = format!(
        "metrics_listen = \"127.0.0.1:9464\"\n[cloudshark.lab]\nurl = \"{url}\"\ntoken_file = \"{}\"\n{extra}\n",
        token_file.display()
    );
    (section, secrets)
}

/// Starts a capture of `packets` frames that goes to CloudShark too, sends traffic, and
/// waits for its end.
fn capture(daemon: &TestDaemon, veth: &VethPair, packets: u64) -> CaptureInfo {
    let request = CaptureRequest {
        interfaces: vec!["tap".into()],
        packets: Some(packets),
        duration_secs: Some(60.0),
        filter: Some("udp or tcp".into()),
        tags: [("case".to_owned(), "42".to_owned())].into(),
        customer: Some("acme".into()),
        alert_id: Some("4711".into()),
        cloudshark: Some("lab".into()),
        ..CaptureRequest::default()
    };
    let info = daemon.client().start(&request).unwrap();
    assert_eq!(info.request.cloudshark.as_deref(), Some("lab"));
    let frames = sendable(veth);
    let sender = Sender::new(veth);
    for chunk in frames.chunks(200).cycle() {
        if daemon.client().status(&info.id).unwrap().state != CaptureState::Running {
            break;
        }
        sender.send_all(chunk);
    }
    daemon.wait(&info.id)
}

/// The capture as stored in the daemon's local store: one PCAP file (the first object's
/// header, then every object's records, in order).
fn stored_pcap(daemon: &TestDaemon, id: &str) -> Vec<u8> {
    let dir = daemon.store_dir().join(&daemon.node).join(id);
    let mut objects: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pcap"))
        .collect();
    objects.sort();
    assert!(!objects.is_empty(), "no object in {}", dir.display());
    let mut whole = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        let bytes = std::fs::read(object).unwrap();
        whole.extend_from_slice(if i == 0 { &bytes } else { &bytes[24..] });
    }
    whole
}

/// The CloudShark metrics of the daemon in `veth`'s namespace: uploads that went through,
/// uploads that failed, bytes sent, files spooled.
fn metrics(veth: &VethPair) -> (f64, f64, f64, f64) {
    let out = veth
        .capture_ns
        .command("curl")
        .args(["-sf", "http://127.0.0.1:9464/metrics"])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
    };
    (
        value("tapstream_cloudshark_uploads_total{result=\"ok\"}"),
        value("tapstream_cloudshark_uploads_total{result=\"failed\"}"),
        value("tapstream_cloudshark_bytes_total"),
        value("tapstream_cloudshark_spooled_files"),
    )
}

fn cloudshark_of(info: &CaptureInfo) -> CloudSharkSummary {
    let summary = info.summary.as_ref().unwrap_or_else(|| panic!("no summary: {info:?}"));
    summary.cloudshark.clone().unwrap_or_else(|| panic!("no cloudshark in the summary: {summary:?}"))
}

/// The files waiting in the daemon's CloudShark spool.
fn spooled(daemon: &TestDaemon) -> Vec<PathBuf> {
    let dir = daemon.dir.path().join("state/cloudshark");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "pcap")).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn a_finished_capture_lands_in_cloudshark_byte_for_byte_with_its_tags() {
    let veth = VethPair::new(1);
    let server = CloudSharkServer::start(&veth);
    let (mut daemon, _secrets) = daemon(&veth, &server.url(), TOKEN, "");
    let info = capture(&daemon, &veth, 300);
    assert_eq!(info.summary.as_ref().unwrap().packets, 300);
    let cloudshark = cloudshark_of(&info);
    assert_eq!(cloudshark.error, None, "{cloudshark:?}");
    assert_eq!(cloudshark.destination, server.url());
    assert_eq!(cloudshark.files.len(), 1, "{cloudshark:?}");
    let file = &cloudshark.files[0];
    assert_eq!(file.url, format!("http://{}/captures/{}", server.addr, file.id));
    assert_eq!(file.filename, format!("{}.pcap", info.id));
    let received = server.received();
    assert_eq!(received.len(), 1);
    let got = &received[0];
    assert!(
        got.file == stored_pcap(&daemon, &info.id),
        "the file CloudShark got is the stored capture, byte for byte"
    );
    assert_eq!(file.bytes, got.file.len() as u64);
    assert_eq!(
        (got.filename.as_str(), got.part_filename.as_str()),
        (file.filename.as_str(), file.filename.as_str())
    );
    assert_eq!(got.tags, ["case:42", "customer:acme", "alert:4711", "node:testnode"]);
    for part in [info.id.as_str(), "on testnode", "tap (", "filter \"udp or tcp\"", " to "] {
        assert!(got.description.contains(part), "the description names {part:?}: {}", got.description);
    }
    assert!(spooled(&daemon).is_empty(), "nothing left in the spool");
    assert_eq!(metrics(&veth), (1.0, 0.0, file.bytes as f64, 0.0), "ok, failed, bytes, spooled");
    // The token is in no summary, state file or log line.
    let state =
        std::fs::read_to_string(daemon.dir.path().join(format!("state/captures/{}.json", info.id))).unwrap();
    assert!(state.contains(&file.url) && !state.contains(TOKEN), "{state}");
    let (_, log) = daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    assert!(!log.contains(TOKEN), "the token is logged: {log}");
}

#[test]
fn a_large_capture_is_sent_as_files_cut_at_split_bytes() {
    let veth = VethPair::new(1);
    let server = CloudSharkServer::start(&veth);
    let (daemon, _secrets) = daemon(&veth, &server.url(), TOKEN, "split_bytes = 65536");
    let info = capture(&daemon, &veth, 1000);
    let cloudshark = cloudshark_of(&info);
    assert_eq!(cloudshark.error, None, "{cloudshark:?}");
    let received = server.received();
    assert!(received.len() > 1, "{} files", received.len());
    assert_eq!(cloudshark.files.len(), received.len());
    let whole = stored_pcap(&daemon, &info.id);
    let mut joined = whole[..24].to_vec();
    for (i, got) in received.iter().enumerate() {
        assert!(got.file.len() <= 65536, "file {i} is {} bytes", got.file.len());
        assert_eq!(got.file[..24], whole[..24], "each file is a PCAP file of its own");
        assert_eq!(got.filename, format!("{}-{}of{}.pcap", info.id, i + 1, received.len()));
        joined.extend_from_slice(&got.file[24..]);
    }
    assert!(joined == whole, "the files' frames, in order, are the capture's");
}

#[test]
fn a_wrong_token_is_a_clear_error_and_the_capture_waits_in_the_spool() {
    let veth = VethPair::new(1);
    let server = CloudSharkServer::start(&veth);
    let (mut daemon, secrets) = daemon(&veth, &server.url(), "0ther70ken", "");
    let info = capture(&daemon, &veth, 100);
    let cloudshark = cloudshark_of(&info);
    let error = cloudshark.error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!("CloudShark at {} refused the API token: HTTP 401", server.addr))
            && error.contains("API Token is missing or invalid"),
        "{error}"
    );
    assert!(!error.contains("0ther70ken"));
    assert!(cloudshark.files.is_empty());
    assert_eq!(server.state.lock().unwrap().wrong_token, 1, "refused for good: not tried again");
    let spool = spooled(&daemon);
    assert_eq!(cloudshark.spooled, spool.iter().map(|p| p.display().to_string()).collect::<Vec<_>>());
    assert!(std::fs::read(&spool[0]).unwrap() == stored_pcap(&daemon, &info.id), "the capture is kept whole");
    assert_eq!(daemon.stored(&info.id).len(), 100, "and in the store");
    assert_eq!(metrics(&veth).3, 1.0, "one file spooled");
    // With the token fixed, the next start sends it, and the summary records it.
    let (status, _) = daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    assert!(status.success());
    std::fs::write(secrets.path().join("cloudshark-token"), TOKEN).unwrap();
    daemon.restart(&veth);
    let id = info.id.clone();
    let delivered = eventually("the spooled file delivered at start", || {
        let c = cloudshark_of(&daemon.client().status(&id).unwrap());
        (!c.files.is_empty()).then_some(c)
    });
    assert_eq!((delivered.error, delivered.spooled.len()), (None, 0));
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].file == stored_pcap(&daemon, &id), "the capture, whole");
    assert!(spooled(&daemon).is_empty());
}

#[test]
fn through_a_timeout_and_an_outage_the_capture_is_spooled_then_delivered_once() {
    let veth = VethPair::new(1);
    let mut server = CloudSharkServer::start(&veth);
    let (daemon, _secrets) =
        daemon(&veth, &server.url(), TOKEN, "timeout_secs = 1\nattempts = 2\nretry_secs = 1");
    // CloudShark hangs.
    server.hang(true);
    let info = capture(&daemon, &veth, 100);
    let cloudshark = cloudshark_of(&info);
    let error = cloudshark.error.clone().unwrap_or_default();
    assert!(error.contains(&format!("CloudShark at {} did not answer within 1 s", server.addr)), "{error}");
    assert_eq!(cloudshark.spooled.len(), 1, "{cloudshark:?}");
    // Then it is down: the spool keeps the file through the retries.
    server.down();
    server.hang(false);
    let id = info.id.clone();
    let down = eventually("a retry against the server down", || {
        let c = cloudshark_of(&daemon.client().status(&id).unwrap());
        c.error.clone().filter(|e| e.contains("cannot connect to CloudShark"))
    });
    assert!(down.contains(&server.addr.to_string()), "{down}");
    assert_eq!(spooled(&daemon).len(), 1);
    // Back up: delivered from the spool, recorded in the summary.
    server.up(&veth);
    let delivered = eventually("the spooled file delivered", || {
        let c = cloudshark_of(&daemon.client().status(&id).unwrap());
        (!c.files.is_empty()).then_some(c)
    });
    assert_eq!(delivered.error, None);
    assert!(delivered.spooled.is_empty());
    assert!(spooled(&daemon).is_empty(), "the spool is empty");
    let received = server.received();
    assert_eq!(received.len(), 1, "delivered exactly once");
    assert!(received[0].file == stored_pcap(&daemon, &id), "whole");
    let (ok, failed, bytes, spooled) = metrics(&veth);
    assert_eq!((ok, spooled), (1.0, 0.0));
    assert!(failed >= 3.0, "two timeouts at the end, then refused connections: {failed}");
    assert!(bytes >= received[0].file.len() as f64, "{bytes}");
    assert_eq!(delivered.files[0].url, format!("http://{}/captures/{}", server.addr, delivered.files[0].id));
}

#[test]
fn a_capture_whose_destination_is_cloudshark_is_sent_and_not_kept() {
    let veth = VethPair::new(1);
    let server = CloudSharkServer::start(&veth);
    let (daemon, _secrets) = daemon(&veth, &server.url(), TOKEN, "");
    // An appliance that is not configured is refused, with the list of those that are.
    let other = CaptureRequest {
        destination: Some("cloudshark://elsewhere.example.net".into()),
        ..CaptureRequest::default()
    };
    let error = daemon.client().start(&other).unwrap_err().to_string();
    assert!(error.contains("elsewhere.example.net") && error.contains(&server.url()), "{error}");
    let request = CaptureRequest {
        interfaces: vec!["tap".into()],
        packets: Some(150),
        duration_secs: Some(60.0),
        destination: Some(server.url()),
        ..CaptureRequest::default()
    };
    let info = daemon.client().start(&request).unwrap();
    assert_eq!(info.request.cloudshark.as_deref(), Some("lab"));
    let frames = sendable(&veth);
    let sent = Sender::new(&veth).send_all(&frames[..600]);
    let info = daemon.wait(&info.id);
    let cloudshark = cloudshark_of(&info);
    assert_eq!((cloudshark.files.len(), cloudshark.error.as_deref()), (1, None), "{cloudshark:?}");
    let received = server.received();
    assert_eq!(received.len(), 1);
    let frames: Vec<Vec<u8>> = crate::catalog::records(&received[0].file).into_iter().map(|r| r.2).collect();
    assert!(frames == crate::daemon::data(&sent[..150]), "the first 150 frames sent");
    // Nothing of it is kept here: no staged object, nothing in the spool, no output listed.
    let staging = daemon.dir.path().join("state/cloudshark-staging");
    let left: Vec<_> = crate::common::walk(&staging)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&info.id))
        .collect();
    assert!(left.is_empty(), "staged files left: {left:?}");
    assert!(spooled(&daemon).is_empty());
    assert!(info.summary.as_ref().unwrap().outputs.is_empty());
}

#[test]
fn as_pcapng_the_file_holds_the_same_frames_and_names_the_capture() {
    let veth = VethPair::new(1);
    let server = CloudSharkServer::start(&veth);
    let (daemon, secrets) = daemon(&veth, &server.url(), TOKEN, "format = \"pcapng\"");
    let info = capture(&daemon, &veth, 120);
    let cloudshark = cloudshark_of(&info);
    assert_eq!(cloudshark.error, None, "{cloudshark:?}");
    assert_eq!(cloudshark.files[0].filename, format!("{}.pcapng", info.id));
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].part_filename, format!("{}.pcapng", info.id));
    let file = secrets.path().join("received.pcapng");
    std::fs::write(&file, &received[0].file).unwrap();
    let (comment, interfaces) = crate::catalog::capinfos(&file);
    assert!(comment.contains(&info.id) && comment.contains("acme") && comment.contains("4711"), "{comment}");
    assert_eq!(interfaces.len(), 1, "{interfaces:?}");
    let stored = crate::catalog::records(&stored_pcap(&daemon, &info.id));
    assert_eq!(stored.len(), 120);
    assert!(crate::catalog::pcapng_records(&file) == stored, "the stored frames, with their times");
}

#[test]
fn alongside_s3_the_capture_stays_in_the_bucket_and_lands_in_cloudshark() {
    use tapstream::store::Sink as _;
    let veth = VethPair::new(1);
    let garage = tapstream_testenv::Garage::start_in(&veth.capture_ns);
    let server = CloudSharkServer::start(&veth);
    let (section, _secrets) = appliance(&server.url(), TOKEN, "");
    let prefix = tapstream_testenv::unique_name("cs");
    let (bucket, endpoint, region) = (&garage.bucket, &garage.endpoint, &garage.region);
    let daemon = TestDaemon::start_with_store(
        &veth,
        &section,
        |d| {
            format!(
                "destinations = [\"s3://{bucket}/{prefix}\"]\ns3_endpoint = \"{endpoint}\"\n\
                 s3_region = \"{region}\"\ns3_path_style = true\ncompression = \"3\"\n\
                 spool_dir = \"{d}/spool\"\n"
            )
        },
        garage.aws_env(),
    );
    let request = CaptureRequest {
        interfaces: vec!["tap".into()],
        packets: Some(200),
        duration_secs: Some(60.0),
        customer: Some("acme".into()),
        cloudshark: Some(server.url()),
        ..CaptureRequest::default()
    };
    let info = daemon.client().start(&request).unwrap();
    let frames = sendable(&veth);
    let sent = Sender::new(&veth).send_all(&frames[..800]);
    let info = daemon.wait(&info.id);
    let summary = info.summary.clone().unwrap();
    let cloudshark = cloudshark_of(&info);
    assert_eq!((cloudshark.files.len(), cloudshark.error.as_deref()), (1, None), "{cloudshark:?}");
    // In the bucket, as without CloudShark.
    assert!(!summary.outputs.is_empty());
    let listed = veth.capture_ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { crate::upload::sink(&garage).await.list(&prefix, None).await.unwrap() })
    });
    for output in &summary.outputs {
        let key = output.strip_prefix(&format!("s3://{bucket}/")).unwrap();
        assert!(listed.iter().any(|(k, _)| k == key), "{key} is not in the bucket: {listed:?}");
    }
    // And in CloudShark: the frames sent, in order, from the compressed objects read back.
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].tags, ["customer:acme", "node:testnode"]);
    let got: Vec<Vec<u8>> = crate::catalog::records(&received[0].file).into_iter().map(|r| r.2).collect();
    assert!(got == crate::daemon::data(&sent[..200]), "the first 200 frames sent");
}

#[test]
fn a_stopping_daemon_spools_the_capture_and_sends_it_when_it_starts_again() {
    let veth = VethPair::new(1);
    let server = CloudSharkServer::start(&veth);
    let (mut daemon, _secrets) = daemon(&veth, &server.url(), TOKEN, "");
    let request = CaptureRequest {
        interfaces: vec!["tap".into()],
        duration_secs: Some(600.0),
        cloudshark: Some("lab".into()),
        ..CaptureRequest::default()
    };
    let id = daemon.client().start(&request).unwrap().id;
    let frames = sendable(&veth);
    let sent = Sender::new(&veth).send_all(&frames[..100]);
    eventually("the frames captured", || {
        (daemon.client().status(&id).unwrap().progress.packets == 100).then_some(())
    });
    // Stopped: the capture ends interrupted, and CloudShark is not waited for.
    let (status, _) = daemon.running.take().unwrap().signal_and_wait(libc::SIGTERM);
    assert!(status.success());
    assert!(server.received().is_empty());
    assert_eq!(spooled(&daemon).len(), 1);
    daemon.restart(&veth);
    let delivered = eventually("the capture sent at start", || {
        let c = cloudshark_of(&daemon.client().status(&id).unwrap());
        (!c.files.is_empty()).then_some(c)
    });
    assert_eq!((delivered.error, delivered.spooled.len()), (None, 0));
    let received = server.received();
    assert_eq!(received.len(), 1);
    let got: Vec<Vec<u8>> = crate::catalog::records(&received[0].file).into_iter().map(|r| r.2).collect();
    assert!(got == crate::daemon::data(&sent), "the 100 frames sent");
}
