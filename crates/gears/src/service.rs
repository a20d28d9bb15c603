//! The control-API face every GEARS service shares: list, start, stop, settings
//! (`/vm/gears/<service>`, `v3 gears`).

use std::sync::Arc;

use serde_json::Value;

/// An API error: HTTP status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub msg: String,
}

impl ApiError {
    pub fn new(status: u16, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            msg: msg.into(),
        }
    }
    pub fn bad(msg: impl Into<String>) -> Self {
        Self::new(400, msg)
    }
}

/// One service's control.
pub trait Service: Send + Sync {
    /// Palacios' name (`syscall_intercept`, ...).
    fn name(&self) -> &'static str;
    /// What it is doing and what it found.
    fn list(&self) -> Value;
    /// Start something (a rule, an injection); returns at least `{"id": N}`.
    fn start(&self, body: &Value) -> Result<Value, ApiError>;
    /// Stop what `start` returned.
    fn stop(&self, id: u64) -> Result<(), ApiError>;
    /// Change settings.
    fn set(&self, _body: &Value) -> Result<Value, ApiError> {
        Err(ApiError::new(
            405,
            format!("{} has no settings", self.name()),
        ))
    }
}

/// What a service offers the control API ([`palacios_vmm::VmHandle::controls`]).
pub struct ServiceHandle(pub Arc<dyn Service>);

/// Parse a request body into `T`, with the service's name in the error.
pub fn body<T: serde::de::DeserializeOwned>(svc: &str, v: &Value) -> Result<T, ApiError> {
    T::deserialize(v).map_err(|e| ApiError::bad(format!("bad {svc} request: {e}")))
}

/// A service whose state is one serde value behind a mutex, and that tells the cores what to
/// stop at after the state changes (the rule-based services).
pub(crate) trait Stateful: Service + 'static {
    type State: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + 'static;
    fn state(&self) -> &std::sync::Mutex<Self::State>;
    /// Ask the cores for what `s` needs.
    fn publish(&self, s: &Self::State);
}

/// The end of a service's creation: its state goes into checkpoints (restoring it also
/// publishes it), and the control API can find it. Keep the returned handle alive.
pub(crate) fn install<T: Stateful>(
    ctx: &mut palacios_vmm::BuildCtx,
    inner: &Arc<T>,
) -> Arc<ServiceHandle> {
    let (s, l) = (inner.clone(), inner.clone());
    ctx.register_state(palacios_vmm::state::state_fn(
        1,
        move || crate::lock(s.state()).clone(),
        move |v: T::State| {
            l.publish(&v);
            *crate::lock(l.state()) = v;
            Ok(())
        },
    ));
    let handle = Arc::new(ServiceHandle(inner.clone()));
    ctx.vm.add_control(&handle);
    handle
}
