# Sourced by the bench scripts: install Debian's qemu-system-x86 (the reference) if missing.
if ! command -v qemu-system-x86_64 >/dev/null; then
  echo "bench: installing qemu-system-x86 (the reference)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q qemu-system-x86 >/dev/null
fi
