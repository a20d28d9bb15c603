/*
 * blob_getpid: position-independent code for GEARS code injection. entry() is at offset 0
 * of blob_getpid.bin (scripts/build-gears-guest.sh: the only function here, .text only, no
 * relocations); it makes the getpid system call and returns its result in RAX.
 */
long entry(void)
{
    long ret = 39; /* __NR_getpid */

    __asm__ volatile("syscall" : "+a"(ret) : : "rcx", "r11", "memory");
    return ret;
}
