#![no_main]
//! The qcow2 header parser: any bytes are a validated header or an error, never a panic,
//! and an accepted header keeps the invariants the qcow2 backend relies on.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = palacios_storage::parse_qcow2_header(data) {
        assert!((9..=21).contains(&h.cluster_bits));
        assert!(h.version == 2 || h.version == 3);
        assert!(h.refcount_order <= 6);
        assert_eq!(h.crypt_method, 0);
        let cs = h.cluster_size();
        assert!(h.l1_table_offset % cs == 0 || h.l1_size == 0);
        assert_eq!(h.refcount_table_offset % cs, 0);
        assert!(h.refcount_table_clusters > 0);
        // The L1 table maps the whole disk.
        let per_l1 = cs << h.l2_bits();
        assert!(u64::from(h.l1_size) >= h.size.div_ceil(per_l1));
    }
});
