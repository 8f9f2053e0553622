//! The daemon's event bus: every event goes to every registered client connection.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;

use virt::{DomainEvent, LifecycleEvent};

/// Events queued per subscriber before it is dropped as too slow.
const QUEUE: usize = 4096;

#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<(Option<String>, SyncSender<DomainEvent>)>>,
}

impl EventBus {
    /// A new subscription (`domain`: only that domain's events).
    pub fn subscribe(&self, domain: Option<String>) -> Receiver<DomainEvent> {
        let (tx, rx) = sync_channel(QUEUE);
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((domain, tx));
        rx
    }

    pub fn emit(&self, event: DomainEvent) {
        tracing::debug!("event: {}", event.to_virsh_line());
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|(filter, tx)| {
            if filter.as_deref().is_some_and(|f| f != event.domain()) {
                return true;
            }
            match tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!("event subscriber too slow: dropped");
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }

    pub fn lifecycle(&self, domain: &str, event: LifecycleEvent, detail: &str) {
        self.emit(DomainEvent::Lifecycle {
            domain: domain.to_string(),
            event,
            detail: detail.to_string(),
        });
    }
}
