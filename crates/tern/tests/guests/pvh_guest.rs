//! The PVH test guest: a small kernel Tern did not write, for `tern run --kernel` and QEMU's
//! `-kernel`. Built by `crates/tern/build.rs` (rustc, `global_asm!`, `pvh_guest.ld`).
//!
//! * Boot CPU: PVH entry (32-bit protected mode, paging off, `ebx` = `hvm_start_info`). If the
//!   command line contains `halt`, the application processors halt at CPL 0 once up; if it
//!   contains `reset`, CPU 0 writes 0xfe to the i8042 (port 0x64) after its pass 3. Copies the
//!   AP trampoline to 0x8000 and sends INIT + SIPI (vector 8) to all other CPUs through the LAPIC.
//! * Every CPU (APs through the 16-bit trampoline): takes an index (`lock xadd`), loads the GDT,
//!   its own TSS descriptor (I/O bitmap admitting ports 0..0x3ff: PVM checks it even with IOPL 3),
//!   page tables (first GiB, 2 MiB user pages), long mode, then `iretq` to CPL 3, IOPL 3, IF 0.
//!   At most 4 CPUs.
//! * At CPL 3, CPU `i` owns 256 pages at 16 MiB + i MiB. Pass `p` (from 0) checks that word 0 of
//!   page `k` holds `(i << 56) | ((p - 1) << 20) | k` (pass > 0), writes `(i << 56) | (p << 20) | k`,
//!   and prints `hb I PPPPPPPP ok` (or `BAD`) on COM1, under a spinlock, then spins ~2^26 loops.
//!
//! Output of one CPU: `PVH test guest\n`, `cpu 0 up\n`, then `hb 0 00000000 ok\n`,
//! `hb 0 00000001 ok\n`, ...

#![no_std]
#![no_main]

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

core::arch::global_asm!(
    r#"
    .set COM1, 0x3f8
    .set TSS_BASE, 0x140000
    .set TSS_LIMIT, 0x68 + 0x80
    .set AP_TRAMPOLINE, 0x8000
    .set PAT_BASE, 0x1000000
    .set PAT_PAGES, 256
    .set MAX_CPUS, 4
    .set SPIN, 0x4000000

    .section .text.pvh_entry, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    // The command line: look for "halt" and "reset".
    movl 24(%ebx), %esi                 // hvm_start_info.cmdline_paddr (low half)
    testl %esi, %esi
    jz 3f
1:  movl (%esi), %eax
    testb %al, %al
    jz 3f
    cmpl $0x746c6168, %eax              // "halt"
    jne 2f
    movl $1, halt_aps
2:  cmpl $0x65736572, %eax              // "rese(t)"
    jne 4f
    movl $1, reset_at_pass_3
4:  incl %esi
    jmp 1b
3:
    // The AP trampoline to 0x8000, then INIT and SIPI (vector 8) to all but self.
    movl $ap_trampoline, %esi
    movl $AP_TRAMPOLINE, %edi
    movl $(ap_trampoline_end - ap_trampoline), %ecx
    rep movsb
    movl $0x000c4500, 0xfee00300
    movl $0x000c4608, 0xfee00300
    jmp common32

    // ---- AP trampoline: copied to 0x8000, entered in real mode at 0800:0000 ----
    .code16
ap_trampoline:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdt_ptr - ap_trampoline
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_start32
    .balign 4
ap_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:

    .code32
ap_start32:
    movl $0x18, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss

common32:
    lgdtl gdt_ptr
    ljmpl $0x08, $1f
1:  movl $0x18, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl $1, %edi
    lock xaddl %edi, next_cpu           // edi = this CPU's index
    cmpl $MAX_CPUS, %edi
    jae halt_forever
    movl $0x620, %eax                   // CR4 = PAE | OSFXSR | OSXMMEXCPT
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx              // EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80010033, %eax              // CR0 = PG | WP | NE | ET | MP | PE
    movl %eax, %cr0
    ljmpl $0x10, $start64

halt_forever:
    hlt
    jmp halt_forever

    .code64
start64:
    movl %edi, %eax
    shll $12, %eax
    movq $stacks_top, %rsp
    subq %rax, %rsp
    movl %edi, %eax
    shll $4, %eax
    addl $0x30, %eax
    ltr %ax
    testl %edi, %edi
    jnz 1f
    leaq banner(%rip), %rsi
    call print_str_locked
1:  call print_up
    testl %edi, %edi
    jz 2f
    cmpl $0, halt_aps(%rip)
    je 2f
    // An AP told to halt: IF = 0, so it stays halted (inside KVM_RUN) for good.
3:  hlt
    jmp 3b
2:  movq %rsp, %rax
    pushq $0x23                         // SS
    pushq %rax                          // RSP
    pushq $0x3002                       // RFLAGS: IOPL 3, IF 0
    pushq $0x2b                         // CS
    leaq user_main(%rip), %rax
    pushq %rax
    iretq

    // ---- CPL 3 ----
user_main:
    movl %edi, %r12d                    // CPU index
    movq %r12, %r13
    shlq $20, %r13
    addq $PAT_BASE, %r13                // this CPU's pages
    xorl %r14d, %r14d                   // pass
pass_loop:
    xorl %r15d, %r15d                   // errors
    xorl %ecx, %ecx                     // page k
page_loop:
    movq %r12, %rax
    shlq $56, %rax
    movq %r14, %rdx
    shlq $20, %rdx
    orq %rdx, %rax
    orq %rcx, %rax                      // value(p, k)
    movq %rcx, %rdx
    shlq $12, %rdx
    addq %r13, %rdx                     // page address
    testq %r14, %r14
    jz 1f
    movq %rax, %rbx
    subq $(1 << 20), %rbx               // value(p - 1, k)
    cmpq %rbx, (%rdx)
    je 1f
    incl %r15d
1:  movq %rax, (%rdx)
    incl %ecx
    cmpl $PAT_PAGES, %ecx
    jb page_loop
    // "hb I PPPPPPPP ok\n"
    call lock_print
    movb $'h', %al
    call putc
    movb $'b', %al
    call putc
    movb $' ', %al
    call putc
    movb %r12b, %al
    addb $'0', %al
    call putc
    movb $' ', %al
    call putc
    movl %r14d, %eax
    call put_hex32
    leaq ok_str(%rip), %rsi
    testl %r15d, %r15d
    jz 2f
    leaq bad_str(%rip), %rsi
2:  call puts
    call unlock_print
    // "reset" on the command line: CPU 0 pulses the reset line through the i8042 after pass 3.
    cmpq $3, %r14
    jne 4f
    testl %r12d, %r12d
    jnz 4f
    cmpl $0, reset_at_pass_3(%rip)
    je 4f
    movb $0xfe, %al
    outb %al, $0x64
4:  incq %r14
    movl $SPIN, %ecx
3:  decl %ecx
    jnz 3b
    jmp pass_loop

    // ---- console (any CPL with IOPL 3) ----
putc:                                   // al
    movw $COM1, %dx
    outb %al, %dx
    ret
puts:                                   // rsi = NUL-terminated string
    movb (%rsi), %al
    testb %al, %al
    jz 1f
    call putc
    incq %rsi
    jmp puts
1:  ret
put_hex32:                              // eax
    movl %eax, %ebx
    movl $8, %r8d
1:  roll $4, %ebx
    movl %ebx, %eax
    andb $0xf, %al
    addb $'0', %al
    cmpb $'9', %al
    jbe 2f
    addb $('a' - '9' - 1), %al
2:  call putc
    decl %r8d
    jnz 1b
    ret
lock_print:
    movl $1, %eax
    xchgl %eax, print_lock(%rip)
    testl %eax, %eax
    jz 1f
    pause
    jmp lock_print
1:  ret
unlock_print:
    movl $0, print_lock(%rip)
    ret
print_str_locked:                       // rsi
    call lock_print
    call puts
    jmp unlock_print
print_up:                               // "cpu I up\n"
    call lock_print
    leaq cpu_str(%rip), %rsi
    call puts
    movb %dil, %al
    addb $'0', %al
    call putc
    leaq up_str(%rip), %rsi
    call puts
    jmp unlock_print

    .section .rodata
banner: .asciz "PVH test guest\n"
cpu_str: .asciz "cpu "
up_str: .asciz " up\n"
ok_str: .asciz " ok\n"
bad_str: .asciz " BAD\n"

    // ---- ELF note: XEN_ELFNOTE_PHYS32_ENTRY ----
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32

    .section .data.pvh, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x67
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x67
    .fill 511, 8, 0
pd:
    .set pd_addr, 0
    .rept 512
    .quad pd_addr + 0xe7                // P | RW | U/S | A | D | PS
    .set pd_addr, pd_addr + 0x200000
    .endr
    .balign 16
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            // 0x08 code32
    .quad 0x00af9a000000ffff            // 0x10 code64
    .quad 0x00cf92000000ffff            // 0x18 data
    .quad 0x00cff2000000ffff            // 0x23 user data
    .quad 0x00affa000000ffff            // 0x2b user code64
    .rept MAX_CPUS                      // 0x30, 0x40, ...: 64-bit TSS descriptors
    .quad TSS_LIMIT | ((TSS_BASE & 0xffffff) << 16) | (0x89 << 40) | ((TSS_BASE >> 24) << 56)
    .quad 0
    .endr
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .balign 4
next_cpu: .long 0
halt_aps: .long 0
reset_at_pass_3: .long 0
print_lock: .long 0
    .balign 4096
    .fill MAX_CPUS * 4096, 1, 0
stacks_top:

    // The TSS (shared by all CPUs: only the I/O bitmap is used): I/O map base 0x68, 0x80 zero
    // bytes (ports 0..0x3ff allowed), the terminating 0xff.
    .section .pvh_tss, "aw"
    .fill 0x66, 1, 0
    .word 0x68
    .fill 0x80, 1, 0
    .byte 0xff
"#,
    options(att_syntax)
);
