//! One capture in the calling thread until its first limit: the one-shot `tapstream capture`.

use std::time::Duration;

use crate::{
    datapath::capture::{Budget, CaptureSpec, Limits, StopReason},
    datapath::pipeline::InterfaceConfig,
    sys::Shutdown,
};

use super::{output::*, service::*, *};

/// Runs one capture on `config.interface` until a limit is reached or `stop` is triggered
/// (then it ends as stopped, its output finished), into `target` (the one-shot `tapstream
/// capture`). `progress` is called about every 200 ms.
pub fn run_capture(
    config: InterfaceConfig,
    spec: CaptureSpec,
    limits: Limits,
    target: Target,
    stop: &Shutdown,
    mut progress: impl FnMut(&Progress),
) -> Result<CaptureSummary, SessionError> {
    let service = InterfaceService::start(config)?;
    let id = spec.id.clone();
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let on_done: OnDone = Box::new(move |result| {
        let _ = done_tx.send(result);
    });
    let shared =
        service.start_capture(CaptureOrder { spec, limits, budget: Budget::new(), target, on_done })?;
    log::info!("capturing on {}", service.interface());
    let mut stopping = false;
    let result = loop {
        match done.recv_timeout(Duration::from_millis(200)) {
            Ok(result) => break result,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break Err(SessionError::ServiceGone),
        }
        if !stopping && stop.is_set() {
            stopping = true;
            service.stop_capture(&id, StopReason::Stopped);
        }
        progress(&shared.lock().unwrap_or_else(|e| e.into_inner()));
    };
    service.shutdown(StopReason::Stopped);
    result
}
