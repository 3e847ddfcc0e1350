//! A test aid: [`FaultSink`] wraps a real [`Sink`] (a [`DirSink`](super::dir::DirSink), an
//! [`S3Sink`](super::s3::S3Sink)), counts its calls per [`Operation`], and fails the calls a
//! test names with the error a store would give ([`Fault`]). Every other call goes to the real
//! sink, so what a test reads back is what a store really holds.
//!
//! ```no_run
//! # use tapstream::store::{dir::DirSink, fault::{Fault, FaultSink, Operation, When}};
//! let sink = FaultSink::new(DirSink::new("/tmp/store").unwrap());
//! // The store refuses part 3 of every upload, for good.
//! sink.inject(Operation::UploadPart, When::Part(3), Fault::Failed("AccessDenied: revoked".into()));
//! // The second PutObject meets a store that is down for a moment.
//! sink.inject(Operation::PutObject, When::Call(2), Fault::Retryable("SlowDown: busy".into()));
//! // ... run the uploads, then:
//! assert_eq!(sink.counts(Operation::UploadPart).injected, 1);
//! ```

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Mutex, MutexGuard},
};

use bytes::Bytes;

use super::{ObjectMeta, PartDone, PendingUpload, Result, Sink, UploadError};

/// A call of the [`Sink`] interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    PutObject,
    CreateMultipart,
    UploadPart,
    CompleteMultipart,
    AbortMultipart,
    ListMultipart,
    /// [`Sink::list`] (ListObjectsV2).
    List,
    Get,
    /// [`Sink::check`], before a capture starts.
    Check,
}

impl Operation {
    /// The S3 request it is, for error messages.
    pub fn request(self) -> &'static str {
        match self {
            Self::PutObject => "PutObject",
            Self::CreateMultipart => "CreateMultipartUpload",
            Self::UploadPart => "UploadPart",
            Self::CompleteMultipart => "CompleteMultipartUpload",
            Self::AbortMultipart => "AbortMultipartUpload",
            Self::ListMultipart | Self::Check => "ListMultipartUploads",
            Self::List => "ListObjectsV2",
            Self::Get => "GetObject",
        }
    }
}

/// Which calls of an operation fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// The `n`th call (counting from 1, the failed calls included), once.
    Call(u64),
    /// Every call for part `number` of an upload ([`Operation::UploadPart`] only).
    Part(i32),
    /// Every call, until [`FaultSink::clear`]: a switch for a store that is down.
    Always,
}

/// The error an injected failure gives, as a store would give it; the text is the store's
/// answer, e.g. `AccessDenied: revoked`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The store is unreachable or busy: a retryable [`UploadError::Store`].
    Retryable(String),
    /// The store says no (wrong or revoked credentials, no such bucket): an
    /// [`UploadError::Store`] that is not retryable.
    Failed(String),
    /// The request is invalid: an [`UploadError::Refused`], which nothing mends.
    Refused(String),
}

impl Fault {
    fn error(&self, operation: Operation, key: &str) -> UploadError {
        let (operation, key) = (operation.request(), key.to_owned());
        match self {
            Self::Retryable(reason) | Self::Failed(reason) => UploadError::Store {
                operation,
                key,
                reason: reason.clone(),
                retryable: matches!(self, Self::Retryable(_)),
                source: Some(Box::new(Injected)),
            },
            Self::Refused(reason) => {
                UploadError::Refused { operation, key, reason: reason.clone(), source: Box::new(Injected) }
            }
        }
    }
}

/// The source of an injected failure, so that a printed chain says where it came from.
#[derive(Debug, thiserror::Error)]
#[error("injected by a test's FaultSink")]
pub struct Injected;

/// What a [`FaultSink`] has seen of one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Calls made, the failed ones included.
    pub calls: u64,
    /// Calls failed by an injected [`Fault`] (they never reached the real sink).
    pub injected: u64,
    /// Calls in the real sink now.
    pub in_flight: u64,
    /// Calls in the real sink at the same time, at most.
    pub max_in_flight: u64,
}

#[derive(Default)]
struct State {
    counts: BTreeMap<Operation, Counts>,
    faults: Vec<(Operation, When, Fault)>,
}

/// A [`Sink`] that counts the calls to a real one and fails those it is told to.
pub struct FaultSink<S> {
    inner: S,
    state: Mutex<State>,
}

impl<S: Sink> FaultSink<S> {
    /// `inner`, with no failure injected yet.
    pub fn new(inner: S) -> Self {
        Self { inner, state: Mutex::new(State::default()) }
    }

    /// The real sink.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Fails the calls of `operation` that `when` names with `fault`.
    pub fn inject(&self, operation: Operation, when: When, fault: Fault) {
        self.state().faults.push((operation, when, fault));
    }

    /// Injects no more failure into `operation`.
    pub fn clear(&self, operation: Operation) {
        self.state().faults.retain(|(op, _, _)| *op != operation);
    }

    /// What `operation` has seen so far.
    pub fn counts(&self, operation: Operation) -> Counts {
        self.state().counts.get(&operation).copied().unwrap_or_default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a call of `operation` (for part `part`, if it uploads one) and runs `call` on
    /// the real sink, unless a fault is injected into it.
    async fn call<T>(
        &self,
        operation: Operation,
        key: &str,
        part: Option<i32>,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let _in_flight = {
            let mut state = self.state();
            let n = {
                let counts = state.counts.entry(operation).or_default();
                counts.calls += 1;
                counts.calls
            };
            let hit = state.faults.iter().position(|(op, when, _)| {
                *op == operation
                    && match when {
                        When::Call(at) => *at == n,
                        When::Part(number) => part == Some(*number),
                        When::Always => true,
                    }
            });
            if let Some(i) = hit {
                let error = state.faults[i].2.error(operation, key);
                if matches!(state.faults[i].1, When::Call(_)) {
                    state.faults.remove(i);
                }
                state.counts.entry(operation).or_default().injected += 1;
                return Err(error);
            }
            let counts = state.counts.entry(operation).or_default();
            counts.in_flight += 1;
            counts.max_in_flight = counts.max_in_flight.max(counts.in_flight);
            InFlight { sink: &self.state, operation }
        };
        call.await
    }
}

/// A call in the real sink; counted out when it ends, or is dropped unfinished.
struct InFlight<'a> {
    sink: &'a Mutex<State>,
    operation: Operation,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counts) = state.counts.get_mut(&self.operation) {
            counts.in_flight -= 1;
        }
    }
}

impl<S: Sink> Sink for FaultSink<S> {
    async fn put_object(&self, key: &str, body: Bytes, meta: &ObjectMeta) -> Result<()> {
        self.call(Operation::PutObject, key, None, self.inner.put_object(key, body, meta)).await
    }

    async fn create_multipart(&self, key: &str, meta: &ObjectMeta) -> Result<String> {
        self.call(Operation::CreateMultipart, key, None, self.inner.create_multipart(key, meta)).await
    }

    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Bytes) -> Result<PartDone> {
        let call = self.inner.upload_part(key, upload_id, number, body);
        self.call(Operation::UploadPart, key, Some(number), call).await
    }

    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: Vec<PartDone>) -> Result<()> {
        let call = self.inner.complete_multipart(key, upload_id, parts);
        self.call(Operation::CompleteMultipart, key, None, call).await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        self.call(Operation::AbortMultipart, key, None, self.inner.abort_multipart(key, upload_id)).await
    }

    async fn list_multipart(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        self.call(Operation::ListMultipart, prefix, None, self.inner.list_multipart(prefix)).await
    }

    async fn list(&self, prefix: &str, max: Option<usize>) -> Result<Vec<(String, u64)>> {
        self.call(Operation::List, prefix, None, self.inner.list(prefix, max)).await
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>) -> Result<Vec<u8>> {
        self.call(Operation::Get, key, None, self.inner.get(key, range)).await
    }

    fn url(&self, key: &str) -> String {
        self.inner.url(key)
    }

    async fn check(&self, prefix: &str) -> Result<()> {
        self.call(Operation::Check, prefix, None, self.inner.check(prefix)).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{report::chain as error_chain, store::dir::DirSink};

    #[test]
    fn faults_hit_the_calls_named_and_the_rest_reach_the_real_store() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FaultSink::new(DirSink::new(dir.path()).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let meta = ObjectMeta::default();
        let put =
            |key: &'static str| rt.block_on(sink.put_object(key, bytes::Bytes::from_static(b"body"), &meta));

        sink.inject(Operation::PutObject, When::Call(2), Fault::Retryable("SlowDown: busy".into()));
        put("a").unwrap();
        let e = put("b").unwrap_err();
        assert!(e.is_retryable() && !e.is_permanent(), "{e:?}");
        assert_eq!(error_chain(&e), "PutObject b: SlowDown: busy: injected by a test's FaultSink");
        put("b").unwrap();
        assert_eq!(
            sink.counts(Operation::PutObject),
            Counts { calls: 3, injected: 1, in_flight: 0, max_in_flight: 1 }
        );
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b"body", "the real store holds it");

        sink.inject(Operation::PutObject, When::Always, Fault::Failed("AccessDenied: revoked".into()));
        for key in ["c", "d"] {
            let e = put(key).unwrap_err();
            assert!(!e.is_retryable() && !e.is_permanent(), "{e:?}");
        }
        assert!(!dir.path().join("c").exists(), "a failed call never reaches the store");
        sink.clear(Operation::PutObject);
        put("c").unwrap();

        sink.inject(Operation::Check, When::Always, Fault::Refused("InvalidRequest: no".into()));
        let e = rt.block_on(sink.check("")).unwrap_err();
        assert!(e.is_permanent() && e.to_string().contains("ListMultipartUploads"), "{e:?}");
        assert_eq!(sink.counts(Operation::ListMultipart).calls, 0, "check is counted as itself");
        assert_eq!(sink.counts(Operation::Get), Counts::default());
    }

    #[test]
    fn a_part_fails_by_its_number_whatever_the_order_of_the_calls() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FaultSink::new(DirSink::new(dir.path()).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        sink.inject(Operation::UploadPart, When::Part(2), Fault::Failed("AccessDenied: revoked".into()));
        let id = rt.block_on(sink.create_multipart("k", &ObjectMeta::default())).unwrap();
        for number in [3, 2, 1, 2] {
            let done = rt.block_on(sink.upload_part("k", &id, number, bytes::Bytes::from_static(b"p")));
            assert_eq!(done.is_err(), number == 2, "part {number}: {done:?}");
        }
        let counts = sink.counts(Operation::UploadPart);
        assert_eq!((counts.calls, counts.injected), (4, 2));
    }
}
