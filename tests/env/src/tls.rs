//! Certificates for the servers the tests start with TLS, made by `openssl`.

use std::{path::Path, process::Command};

/// Makes in `dir`: an authority (`ca.pem`), a server certificate it signed for `sans` (each as
/// `openssl` writes a subjectAltName: `IP:127.0.0.1`, `DNS:localhost`) in `server.pem` and
/// `server.key`, and an unrelated authority (`other-ca.pem`).
pub fn make_certificates(dir: &Path, sans: &[String]) {
    let openssl = |args: &[&str]| {
        crate::run(Command::new("openssl").current_dir(dir).args(args));
    };
    for ca in ["ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=tapstream test {ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=tapstream test server",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("server.ext"), format!("subjectAltName = {}\n", sans.join(",")))
        .expect("write server.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
}
