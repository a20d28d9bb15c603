//! The state model: every stateful part of a VM saves and restores a versioned, serde state
//! value, for checkpoints (and later migration).
//!
//! Devices register their state while they are created ([`crate::BuildCtx::register_state`]),
//! under their config `id`, so a checkpoint section names the device it belongs to. A device
//! class without state says so in its registration ([`crate::DeviceClass::stateless`]); a
//! device of a stateful class that registers nothing is reported by
//! [`crate::Vm::devices_without_state`] and makes a save fail.
//!
//! State values are JSON values (`serde_json::Value`): small, self-describing and easy to
//! inspect in a checkpoint; guest memory is stored separately, raw.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A saved state value.
pub type StateValue = serde_json::Value;

/// Why a state could not be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error(
        "{what}: state version {found} is not supported (this build reads version {supported})"
    )]
    Version {
        what: String,
        found: u32,
        supported: u32,
    },
    #[error("{what}: malformed state: {msg}")]
    Malformed { what: String, msg: String },
    #[error("{what}: {msg}")]
    Invalid { what: String, msg: String },
}

/// Something whose state can be saved and restored.
pub trait Stateful: Send + Sync {
    /// Version of the state layout this build writes and reads.
    fn version(&self) -> u32;
    /// The current state. Called with the VM paused.
    fn save(&self) -> StateValue;
    /// Replace the current state (VM paused or not yet started). `what` names the part in
    /// errors.
    fn restore(&self, what: &str, version: u32, state: &StateValue) -> Result<(), StateError>;
}

type SaveFn<T> = Box<dyn Fn() -> T + Send + Sync>;
type RestoreFn<T> = Box<dyn Fn(T) -> Result<(), String> + Send + Sync>;

/// A [`Stateful`] from two closures over a serde type.
pub struct FnState<T> {
    version: u32,
    save: SaveFn<T>,
    restore: RestoreFn<T>,
}

impl<T: Serialize + DeserializeOwned + 'static> Stateful for FnState<T> {
    fn version(&self) -> u32 {
        self.version
    }
    fn save(&self) -> StateValue {
        serde_json::to_value((self.save)()).unwrap_or_else(|e| {
            tracing::error!(
                "a device state cannot be encoded ({e}); it is saved as null and will not restore"
            );
            StateValue::Null
        })
    }
    fn restore(&self, what: &str, version: u32, state: &StateValue) -> Result<(), StateError> {
        if version != self.version {
            return Err(StateError::Version {
                what: what.into(),
                found: version,
                supported: self.version,
            });
        }
        let v: T = T::deserialize(state).map_err(|e| StateError::Malformed {
            what: what.into(),
            msg: e.to_string(),
        })?;
        (self.restore)(v).map_err(|msg| StateError::Invalid {
            what: what.into(),
            msg,
        })
    }
}

/// State from closures: `save` returns the state, `restore` installs one (and re-arms timers,
/// recomputes interrupt lines, ...), refusing values that make no sense with a message.
pub fn state_fn<T: Serialize + DeserializeOwned + 'static>(
    version: u32,
    save: impl Fn() -> T + Send + Sync + 'static,
    restore: impl Fn(T) -> Result<(), String> + Send + Sync + 'static,
) -> Arc<dyn Stateful> {
    Arc::new(FnState {
        version,
        save: Box::new(save),
        restore: Box::new(restore),
    })
}

/// The state of one device, kept by its config id.
#[derive(Clone)]
pub struct DeviceState {
    pub id: String,
    pub class: String,
    pub state: Arc<dyn Stateful>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn fn_state_round_trips_and_checks_version_and_shape() {
        let cell = Arc::new(Mutex::new((1u8, String::from("a"))));
        let (c1, c2) = (cell.clone(), cell.clone());
        let s = state_fn(
            2,
            move || c1.lock().unwrap().clone(),
            move |v: (u8, String)| {
                if v.0 == 0 {
                    return Err("zero is not allowed".into());
                }
                *c2.lock().unwrap() = v;
                Ok(())
            },
        );
        let saved = s.save();
        *cell.lock().unwrap() = (9, "z".into());
        s.restore("dev", 2, &saved).unwrap();
        assert_eq!(*cell.lock().unwrap(), (1, "a".into()));
        assert!(matches!(
            s.restore("dev", 3, &saved),
            Err(StateError::Version {
                found: 3,
                supported: 2,
                ..
            })
        ));
        let e = s
            .restore("dev", 2, &serde_json::json!({"x": 1}))
            .unwrap_err();
        assert!(e.to_string().starts_with("dev: malformed state"), "{e}");
        let e = s
            .restore("dev", 2, &serde_json::json!([0, "b"]))
            .unwrap_err();
        assert_eq!(e.to_string(), "dev: zero is not allowed");
    }
}
