//! How an error reads in a log line, a summary or a reply: one line, each cause after a colon.

/// An error and its causes, as one line; a cause whose words its error already holds is not
/// repeated.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
