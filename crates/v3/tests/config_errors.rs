//! Every class of config error gives status 2 and a message naming the problem, file, line and
//! column. None of these needs KVM: configs are checked before a backend is opened.

mod common;
use common::*;

fn write_cfg(dir: &std::path::Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

fn expect_error(args: &[&str], needles: &[&str]) {
    let r = v3(args, b"", LIMIT);
    assert_eq!(r.status, 2, "{}", r.out());
    for n in needles {
        assert!(r.stderr.contains(n), "stderr lacks {n:?}\n{}", r.out());
    }
}

#[test]
fn unknown_device_class_lists_the_known_ones() {
    let d = tmpdir("cls");
    let c = write_cfg(
        &d,
        "vm.xml",
        "<vm class=\"PC\">\n<devices>\n  <device class=\"SERIALS\" id=\"s\"/>\n</devices></vm>",
    );
    expect_error(
        &["run", &c],
        &[
            &format!("{c}:3:"),
            "unknown device class 'SERIALS'",
            "SERIAL",
            "BOCHS_DEBUG",
            "GENERIC",
        ],
    );
    expect_error(&["check", &c], &["unknown device class 'SERIALS'"]);
}

#[test]
fn unknown_option_names_option_and_class() {
    let d = tmpdir("opt");
    let c = write_cfg(
        &d,
        "vm.xml",
        "<vm class=\"PC\"><devices>\n<device class=\"DEBUG_EXIT\" id=\"x\" baud=\"9600\"/></devices></vm>",
    );
    expect_error(
        &["check", &c],
        &[
            &format!("{c}:2:"),
            "unknown option 'baud'",
            "device class DEBUG_EXIT",
        ],
    );
}

#[test]
fn missing_file_names_the_path() {
    let d = tmpdir("file");
    let c = write_cfg(
        &d,
        "vm.xml",
        "<vm class=\"PC\"><files>\n<file id=\"k\" filename=\"guest.elf\"/></files></vm>",
    );
    expect_error(
        &["check", &c],
        &[
            &format!("file not found: {}", d.join("guest.elf").display()),
            ":2:",
        ],
    );
    expect_error(
        &["run", "--kernel", "/nonexistent/k.elf"],
        &["kernel file not found: /nonexistent/k.elf"],
    );
    expect_error(
        &["check", "/nonexistent/vm.xml"],
        &["/nonexistent/vm.xml", "cannot read config"],
    );
}

#[test]
fn malformed_xml_gives_line_and_column() {
    let d = tmpdir("xml");
    let c = write_cfg(
        &d,
        "vm.xml",
        "<vm class=\"PC\">\n  <memory>64</memory>\n  <devices>\n</vm>",
    );
    expect_error(&["check", &c], &[&format!("{c}:4:"), "malformed XML"]);
}

#[test]
fn attribute_and_child_at_once_is_an_error() {
    let d = tmpdir("both");
    let c = write_cfg(
        &d,
        "vm.xml",
        "<vm class=\"PC\"><devices><device class=\"DEBUG_EXIT\" id=\"x\" iobase=\"0xf4\">\n<iobase>0x501</iobase></device></devices></vm>",
    );
    expect_error(
        &["check", &c],
        &["both as an attribute and as a child element", ":2:"],
    );
}

#[test]
fn passthrough_generic_modes_are_refused() {
    let d = tmpdir("gen");
    let c = write_cfg(
        &d,
        "vm.xml",
        "<vm class=\"PC\"><devices><device class=\"GENERIC\" id=\"g\">\n<ports start=\"0x80\" end=\"0x80\" mode=\"PASSTHROUGH\"/></device></devices></vm>",
    );
    expect_error(
        &["check", &c],
        &["PASSTHROUGH needs host port access", ":2:"],
    );
}

#[test]
fn bad_guest_images_are_config_errors() {
    let d = tmpdir("img");
    std::fs::write(
        d.join("trunc.elf"),
        &std::fs::read(guest("mbtest.elf")).unwrap()[..600],
    )
    .unwrap();
    let c = write_cfg(
        &d,
        "vm.xml",
        "<vm class=\"PC\"><memory>16</memory><boot format=\"multiboot\" kernel=\"trunc.elf\"/></vm>",
    );
    expect_error(&["check", &c], &["cannot load", "trunc.elf"]);
    std::fs::write(d.join("big.bin"), vec![0u8; 0x10_0000]).unwrap();
    let c = write_cfg(
        &d,
        "vm2.xml",
        "<vm class=\"PC\"><boot format=\"flat\" kernel=\"big.bin\"/></vm>",
    );
    expect_error(&["check", &c], &["below 1 MiB"]);
    let c = write_cfg(
        &d,
        "vm3.xml",
        "<vm class=\"PC\"><memory>2</memory><boot format=\"elf64\" kernel=\"big.bin\"/></vm>",
    );
    expect_error(&["check", &c], &["not a 64-bit ELF"]);
}

/// `--format auto` runs nothing it does not recognise: garbage, a truncated ELF and a PNG are
/// clear errors (status 2, before any backend is opened), and only `--format flat` runs a
/// file without the boot-sector signature.
#[test]
fn format_auto_refuses_what_it_does_not_recognise() {
    let d = tmpdir("auto");
    let garbage = d.join("garbage.bin");
    std::fs::write(&garbage, b"0123456789").unwrap();
    let trunc = d.join("trunc64.elf");
    std::fs::write(
        &trunc,
        &std::fs::read(guest("elf64test.elf")).unwrap()[..100],
    )
    .unwrap();
    let trunc32 = d.join("trunc32.elf");
    std::fs::write(
        &trunc32,
        &std::fs::read(guest("mbtest.elf")).unwrap()[..100],
    )
    .unwrap();
    let png = d.join("picture.png");
    let mut p = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    p.resize(4096, 0);
    std::fs::write(&png, &p).unwrap();
    for (file, needles) in [
        (
            &garbage,
            &["cannot tell the kernel's format (10 bytes", "--format flat"][..],
        ),
        (
            &png,
            &[
                "cannot tell the kernel's format",
                "89 50 4e 47",
                "--format flat",
            ][..],
        ),
        (&trunc, &["truncated"][..]),
        (&trunc32, &["ELF file", "no Multiboot header"][..]),
    ] {
        let f = file.display().to_string();
        for verb in ["run", "run --backend emu"] {
            let mut args: Vec<&str> = verb.split(' ').collect();
            args.extend(["--kernel", &f]);
            let r = v3(&args, b"", LIMIT);
            assert_eq!(r.status, 2, "{}", r.out());
            for n in needles {
                assert!(r.stderr.contains(n), "stderr lacks {n:?}\n{}", r.out());
            }
            assert!(r.stdout.is_empty(), "nothing may run\n{}", r.out());
        }
    }
    // An explicit flat format still runs a file without the signature: `cli; hlt`.
    let tiny = d.join("clihlt.bin");
    std::fs::write(&tiny, [0xfa, 0xf4]).unwrap();
    let tiny = tiny.display().to_string();
    let r = v3(&["run", "--kernel", &tiny], b"", LIMIT);
    assert_eq!(r.status, 2, "{}", r.out());
    let r = v3(
        &[
            "run",
            "--backend",
            "emu",
            "--format",
            "flat",
            "--kernel",
            &tiny,
        ],
        b"",
        LIMIT,
    );
    assert_eq!(
        r.status,
        0,
        "--format flat must run it to its HLT\n{}",
        r.out()
    );
}

/// Each message names its cause: a directory given as a file, a socket that is not there
/// (refused by `check` as by `run`), too little memory for a bzImage, a size given twice,
/// which of --mem and --cores is wrong; unknown attributes of this project's own elements
/// are a warning naming them.
#[test]
fn smaller_messages_name_the_cause() {
    let d = tmpdir("small");
    let c = write_cfg(
        &d,
        "dir.xml",
        "<vm class=\"PC\"><files><file id=\"k\" filename=\".\"/></files></vm>",
    );
    expect_error(&["check", &c], &["is a directory, not a file"]);
    expect_error(
        &["run", "--kernel", &d.display().to_string()],
        &["is a directory, not a file"],
    );
    let c = write_cfg(
        &d,
        "sock.xml",
        "<vm class=\"PC\"><devices><device class=\"SERIAL\" id=\"s\"/>\
         <device class=\"CHAR_STREAM\" id=\"c\"><name>unix:/nonexistent/dir/sock</name>\
         <frontend tag=\"s\"><com_port>2</com_port></frontend></device></devices>\
         <boot kernel=\"guest:mbtest.elf\"/></vm>",
    );
    for verb in ["check", "run"] {
        expect_error(&[verb, &c], &["no Unix socket at /nonexistent/dir/sock"]);
    }
    // A bzImage-shaped file whose init_size (0x260) asks for 64 MiB.
    let mut bz = vec![0u8; 0x1000];
    bz[0x1f1] = 4;
    bz[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x260..0x264].copy_from_slice(&(64u32 << 20).to_le_bytes());
    let k = d.join("bzImage");
    std::fs::write(&k, &bz).unwrap();
    expect_error(
        &["run", "--mem", "1", "--kernel", &k.display().to_string()],
        &["too little memory for this kernel", "the VM has 1 MiB"],
    );
    let c = write_cfg(
        &d,
        "twice.xml",
        "<vm class=\"PC\"><memory size=\"64\">32</memory></vm>",
    );
    expect_error(&["check", &c], &["<memory> gives its size twice"]);
    expect_error(
        &["run", "--mem", "0", "--kernel", "guest:mbtest.elf"],
        &["--mem 0 is out of range"],
    );
    expect_error(
        &["run", "--cores", "0", "--kernel", "guest:mbtest.elf"],
        &["--cores 0 is out of range"],
    );
    let c = write_cfg(
        &d,
        "attr.xml",
        "<vm class=\"PC\"><backend mode=\"fast\">emu</backend><boot kernel=\"guest:mbtest.elf\"/></vm>",
    );
    let r = v3(&["check", &c], b"", LIMIT);
    assert_eq!(r.status, 0, "{}", r.out());
    assert!(
        r.stderr
            .contains("unknown attribute 'mode' of <backend> is ignored"),
        "{}",
        r.out()
    );
    expect_error(
        &["run", "--kernel", "guest:nope.elf"],
        &["no bundled guest 'nope.elf'", "pctest.elf"],
    );
}

#[test]
fn usage_errors_are_status_2() {
    expect_error(&["run", "--format", "flat"], &["--kernel"]);
    expect_error(&["frobnicate"], &["frobnicate"]);
    expect_error(
        &["run", "--kernel", "x", "--load-addr", "zz"],
        &["not a number"],
    );
}

#[test]
fn check_accepts_a_good_config_and_devices_lists_classes() {
    let d = tmpdir("good");
    std::fs::copy(guest("mbtest.elf"), d.join("k.elf")).unwrap();
    let c = write_cfg(
        &d,
        "vm.xml",
        r#"<vm class="PC"><memory alignment="4KB">64</memory><cores count="2"><core/><core/></cores>
<files><file id="k" filename="k.elf"/></files>
<devices><device class="SERIAL" id="serial"/><device class="GENERIC" id="g"><ports start="0x510" end="0x51f" mode="IGNORE"/></device></devices>
<boot kernel="k" cmdline="test=halt"/></vm>"#,
    );
    let r = v3(&["check", &c], b"", LIMIT);
    assert_eq!(r.status, 0, "{}", r.out());
    assert!(
        r.stdout.contains("OK (64 MiB, 2 core(s), 2 device(s)"),
        "{}",
        r.out()
    );
    let r = v3(&["devices"], b"", LIMIT);
    assert_eq!(r.status, 0);
    for class in [
        "SERIAL",
        "CHAR_STREAM",
        "BOCHS_DEBUG",
        "OS_DEBUG",
        "GENERIC",
        "DEBUG_EXIT",
    ] {
        assert!(
            r.stdout.contains(class),
            "{class} missing from `v3 devices`"
        );
    }
    assert!(r.stdout.contains("iosize"));
}

#[test]
fn overlapping_ports_name_both_devices() {
    let d = tmpdir("overlap");
    let c = write_cfg(
        &d,
        "vm.xml",
        "<vm class=\"PC\"><devices><device class=\"SERIAL\" id=\"serial\"/>\n<device class=\"GENERIC\" id=\"junk\"><ports start=\"0x3fc\" end=\"0x3fd\" mode=\"IGNORE\"/></device></devices></vm>",
    );
    expect_error(
        &["check", &c],
        &["'junk'", "'serial.com1'", "overlaps", ":2:"],
    );
    expect_error(&["run", &c], &["'junk'", "'serial.com1'"]);
}

#[test]
fn missing_kvm_is_one_clear_line_naming_the_backends() {
    let run = |backend: &[&str]| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_v3"));
        let k = guest("mbtest.elf").display().to_string();
        let mut args = vec!["run", "--kernel", &k];
        args.extend_from_slice(backend);
        child
            .env("PALACIOS_KVM_DEVICE", "/nonexistent/kvm")
            .args(&args);
        child.output().unwrap()
    };
    // Asked for KVM explicitly: one line, naming the backends there are.
    let out = run(&["--backend", "kvm"]);
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent/kvm does not exist")
            && err.contains("available backends: kvm")
            && err.contains("emu"),
        "{err}"
    );
    // `auto` (the default) falls back to the emulator and says so.
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("using the emulator backend"), "{err}");
}

/// PCI and virtio wiring mistakes are named: a frontend without a PCI bus, a virtio disk
/// without a backend, a backend whose tag names no frontend, a missing image, a second
/// backend for one frontend, a bad MAC, an NBD server that is not there, a balloon bigger
/// than the guest.
#[test]
fn pci_and_virtio_wiring_errors_name_the_device() {
    let d = tmpdir("virtio-cfg");
    let vm = |devs: &str| {
        format!("<vm class=\"PC\"><memory>64</memory>\n<devices>\n{devs}\n</devices></vm>")
    };
    let cases: &[(&str, &[&str])] = &[
        (
            r#"<device class="LNX_VIRTIO_BLK" id="blk0"/>"#,
            &[
                "device 'blk0' (LNX_VIRTIO_BLK) sits on a PCI bus",
                "class=\"PCI\"",
            ],
        ),
        (
            r#"<device class="PCI" id="pci0"/><device class="LNX_VIRTIO_BLK" id="blk0"><bus>pci0</bus></device>"#,
            &["virtio disk 'blk0' has no backend", "FILEDISK"],
        ),
        (
            r#"<device class="PCI" id="pci0"/><device class="TMPDISK" id="t" size="4"><frontend tag="nope"/></device>"#,
            &["<frontend tag=\"nope\"> of device 't' names no device"],
        ),
        (
            r#"<device class="PCI" id="pci0"/><device class="TMPDISK" id="t" size="4"><frontend tag="pci0"/></device>"#,
            &["'pci0' is not a disk frontend"],
        ),
        (
            r#"<device class="PCI" id="pci0"/><device class="LNX_VIRTIO_BLK" id="b"><bus>pci0</bus></device><device class="FILEDISK" id="f"><path>/no/such/disk.img</path><frontend tag="b"/></device>"#,
            &["/no/such/disk.img"],
        ),
        (
            r#"<device class="PCI" id="pci0"/><device class="LNX_VIRTIO_BLK" id="b"><bus>pci0</bus></device><device class="TMPDISK" id="t1" size="4"><frontend tag="b"/></device><device class="TMPDISK" id="t2" size="4"><frontend tag="b"/></device>"#,
            &["frontend 'b' already has a disk"],
        ),
        (
            r#"<device class="PCI" id="pci0"/><device class="LNX_VIRTIO_NIC" id="n"><bus>pci0</bus><mac>01:02:03:04:05:06</mac></device>"#,
            &["multicast"],
        ),
        (
            r#"<device class="PCI" id="pci0"/><device class="LNX_VIRTIO_NIC" id="n"><bus>pci0</bus><mac>zz</mac></device>"#,
            &["'zz' is not a MAC address"],
        ),
        (
            r#"<device class="PCI" id="pci0"/><device class="LNX_VIRTIO_BLK" id="b"><bus>pci0</bus></device><device class="NETDISK" id="n" IP="127.0.0.1" port="1"><frontend tag="b"/></device>"#,
            &["NBD server 127.0.0.1:1"],
        ),
        (
            r#"<device class="PCI" id="pci0"/><device class="LNX_VIRTIO_BALLOON" id="b"><bus>pci0</bus><target>64</target></device>"#,
            &["64 MiB is not below the guest's 64 MiB"],
        ),
        (
            r#"<device class="PCI" id="pci0"/><device class="LNX_VIRTIO_RNG" id="r"><bus>pci0</bus><slot>1</slot></device>"#,
            &["PCI slot 1: use 2-31"],
        ),
    ];
    for (i, (devs, needles)) in cases.iter().enumerate() {
        let c = write_cfg(&d, &format!("vm{i}.xml"), &vm(devs));
        let mut want: Vec<&str> = needles.to_vec();
        let loc = format!("{c}:");
        want.push(&loc);
        expect_error(&["check", &c], &want);
    }
}
