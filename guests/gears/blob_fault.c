/*
 * blob_fault: position-independent code for GEARS code injection that faults: entry() (at
 * offset 0 of blob_fault.bin) stores to address 16, which is never mapped, and would
 * return 0 if the store did not fault.
 */
long entry(void)
{
    unsigned long addr = 16;

    /* Hide the constant from the compiler, which would otherwise warn about it. */
    __asm__("" : "+r"(addr));
    *(volatile long *)addr = 0;
    return 0;
}
