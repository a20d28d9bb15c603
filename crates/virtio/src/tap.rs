//! A Linux TAP interface with the virtio-net header (IFF_VNET_HDR), so checksum and
//! segmentation offloads pass between the guest and the host stack unchanged.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
pub const TUN_F_CSUM: u32 = 1;
pub const TUN_F_TSO4: u32 = 2;
pub const TUN_F_TSO6: u32 = 4;
pub const TUN_F_TSO_ECN: u32 = 8;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

fn ifreq(name: &str) -> io::Result<IfReq> {
    if name.is_empty() || name.len() > 15 || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{name}' is not an interface name (1-15 characters)"),
        ));
    }
    let mut r = IfReq {
        name: [0; 16],
        data: [0; 24],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(r)
}

pub struct Tap {
    fd: OwnedFd,
    pub name: String,
}

impl Tap {
    /// Open (creating it if it does not exist, which needs CAP_NET_ADMIN) the TAP `name`, with
    /// a 12-byte virtio-net header and non-blocking reads. The interface is brought up.
    pub fn open(name: &str) -> io::Result<Tap> {
        let path = c"/dev/net/tun";
        // SAFETY: a valid NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("opening /dev/net/tun: {e}"),
            ));
        }
        // SAFETY: `fd` is a new descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(name)?;
        let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (name + union).
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("attaching TAP '{name}': {e}"),
            ));
        }
        let hdr: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = req.name.iter().position(|&b| b == 0).unwrap_or(16);
        let tap = Tap {
            fd,
            name: String::from_utf8_lossy(&req.name[..end]).into_owned(),
        };
        tap.set_offload(0)?;
        tap.set_up()?;
        Ok(tap)
    }

    /// Which offloads the host may hand the guest (TUN_F_*): what the guest accepted.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags as the argument value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn ctl_socket() -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2); the result is checked.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor owned here.
        Ok(unsafe { OwnedFd::from_raw_fd(s) })
    }

    fn set_up(&self) -> io::Result<()> {
        let s = Self::ctl_socket()?;
        let mut req = ifreq(&self.name)?;
        // SAFETY: SIOCGIFFLAGS fills the ifreq's flags.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut flags = i16::from_ne_bytes([req.data[0], req.data[1]]);
        flags |= libc::IFF_UP as i16;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: SIOCSIFFLAGS reads the ifreq.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("bringing '{}' up: {e}", self.name),
            ));
        }
        Ok(())
    }

    /// Add this interface to the Linux bridge `bridge`.
    pub fn join_bridge(&self, bridge: &str) -> io::Result<()> {
        let s = Self::ctl_socket()?;
        let name = std::ffi::CString::new(self.name.clone()).map_err(io::Error::other)?;
        // SAFETY: a valid NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req = ifreq(bridge)?;
        req.data[..4].copy_from_slice(&(index as i32).to_ne_bytes());
        // SAFETY: SIOCBRADDIF reads the bridge name and the member's index from the ifreq.
        if unsafe { libc::ioctl(s.as_raw_fd(), SIOCBRADDIF, &req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("adding '{}' to bridge '{bridge}': {e}", self.name),
            ));
        }
        Ok(())
    }

    /// Read one frame (with its header); None when nothing is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(n as usize))
    }

    /// Write one frame (with its header).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of its length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
