//! A minimal APIC bus: routes one [`Interrupt`] to a set of local APICs.
//!
//! VMMs with their own routing (e.g. cross-core queues) can use
//! [`crate::pc::chips::apic::matches`] and [`Lapic::accept`] directly instead.

use crate::pc::chips::apic::lapic::{Action, Lapic};
use crate::pc::chips::apic::msg::{DeliveryMode, Interrupt, Shorthand};

/// Delivers `intr` to every matching, globally enabled APIC in `apics`.
///
/// Lowest-priority messages addressed through the destination field go to
/// one target only: the software-enabled matching APIC with the lowest
/// arbitration priority (ties go to the lowest index). With a shorthand
/// they go to every target, like fixed messages.
///
/// Returns the actions produced, tagged with the index of the APIC that
/// produced them.
pub fn deliver(apics: &mut [Lapic], intr: &Interrupt) -> Vec<(usize, Action)> {
    let targets: Vec<usize> = (0..apics.len())
        .filter(|&i| apics[i].is_destination(intr))
        .collect();
    let chosen: Vec<usize> =
        if intr.mode == DeliveryMode::LowestPriority && intr.shorthand == Shorthand::None {
            targets
                .iter()
                .copied()
                .min_by_key(|&i| (!apics[i].sw_enabled(), apics[i].arbitration_priority(), i))
                .into_iter()
                .collect()
        } else {
            targets
        };
    let mut out = Vec::new();
    for i in chosen {
        out.extend(apics[i].accept(intr).into_iter().map(|a| (i, a)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(id: u32) -> Lapic {
        let mut l = Lapic::new(id, id == 0, 1_000_000_000);
        l.mmio_write(0xf0, 0x1ff, 0);
        l
    }

    #[test]
    fn lowest_priority_picks_lowest_tpr() {
        let mut apics: Vec<Lapic> = (0..3).map(enabled).collect();
        for (i, a) in apics.iter_mut().enumerate() {
            a.mmio_write(0xd0, 1 << (24 + i), 0); // flat logical IDs 1, 2, 4
        }
        apics[0].set_tpr(0x40);
        apics[1].set_tpr(0x20);
        apics[2].set_tpr(0x30);
        let mut i = Interrupt::fixed(0x50, 0x07);
        i.logical = true;
        i.mode = DeliveryMode::LowestPriority;
        assert!(deliver(&mut apics, &i).is_empty());
        assert!(!apics[0].irr_bit(0x50));
        assert!(apics[1].irr_bit(0x50));
        assert!(!apics[2].irr_bit(0x50));
    }

    #[test]
    fn broadcast_nmi_skips_disabled_apic() {
        let mut apics: Vec<Lapic> = (0..3).map(enabled).collect();
        apics[2].set_base_msr(0xfee0_0000).unwrap(); // globally disabled
        let mut i = Interrupt::fixed(0, 0xff);
        i.mode = DeliveryMode::Nmi;
        let out = deliver(&mut apics, &i);
        assert_eq!(out, vec![(0, Action::Nmi), (1, Action::Nmi)]);
    }
}
