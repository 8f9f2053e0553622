//! Entry code: the Tern direct entry (64-bit, CPL 3) and the PVH entry (32-bit protected mode,
//! CPL 0, runs EMULATED on PVM: keep it short). Both end in `tern_main` at CPL 3 with
//! rdi = vCPU index, rsi = vCPU count, rdx = command-line GPA, rcx = TSC kHz (0 = unknown),
//! r8 = entry magic: exactly the System V argument registers of `tern_main`.

use crate::layout;

core::arch::global_asm!(
    r#"
    .section .text.tern_entry, "ax"

    // ---- Tern direct entry (e_entry): already 64-bit, CPL 3, IOPL 3, IF 0 ----
    .code64
    .globl tern_entry64
    .type tern_entry64, @function
tern_entry64:
    andq $-16, %rsp
    xorl %ebp, %ebp
    call tern_main
1:  pause
    jmp 1b

    // ---- PVH entry (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off, ebx = start_info ----
    .code32
    .globl tern_pvh_start32
    .type tern_pvh_start32, @function
tern_pvh_start32:
    cli
    movl %ebx, %esi
    lgdtl tern_gdt_ptr
    movl $0x620, %eax                  // CR4 = PAE | OSFXSR | OSXMMEXCPT
    movl %eax, %cr4
    movl $tern_pvh_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx             // EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80010033, %eax             // CR0 = PE | MP | ET | NE | WP | PG
    movl %eax, %cr0
    ljmpl ${kcs}, $tern_pvh_start64

    .code64
tern_pvh_start64:
    movl ${uds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %fs
    movl %eax, %gs
    movl $tern_boot_stack_top, %esp
    pushq %rsi
    call tern_pvh_fault_setup          // IDT + TSS: exceptions print on COM1 (fault.rs)
    popq %rsi
    movl %esi, %esi                    // start_info GPA, zero-extended
    movq 24(%rsi), %rdx                // hvm_start_info.cmdline_paddr
    pushq ${uds}                       // SS
    pushq ${stack0}                    // RSP
    pushq ${rflags}                    // RFLAGS: IOPL 3, IF 0
    pushq ${ucs}                       // CS
    pushq $tern_entry64                // RIP
    xorl %edi, %edi                    // vCPU 0
    movl $1, %esi                      // of 1
    xorl %ecx, %ecx                    // TSC kHz unknown
    movabsq ${magic}, %r8
    iretq

    // core's unwind tables reference this; with panic=abort it is never called.
    .globl rust_eh_personality
rust_eh_personality:
    ud2

    // ---- ELF note: XEN_ELFNOTE_PHYS32_ENTRY ----
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad tern_pvh_start32

    // ---- PVH data: GDT (+ the TSS slot), page tables (4 GiB identity, 2 MiB pages, U/S), boot stack ----
    .section .data.tern_boot, "aw"
    .balign 16
tern_gdt:
    .quad {g0}, {g1}, {g2}, {g3}, {g4}, {g5}
    .globl tern_gdt_tss
tern_gdt_tss:                          // TSS descriptor (16 bytes), written by fault.rs
    .quad 0, 0
tern_gdt_end:
    .balign 8
tern_gdt_ptr:
    .word tern_gdt_end - tern_gdt - 1
    .long tern_gdt
    .balign 16
    .fill 64, 8, 0
tern_boot_stack_top:

    .balign 4096
tern_pvh_pml4:
    .quad tern_pvh_pdpt + 0x67
    .fill 511, 8, 0
tern_pvh_pdpt:
    .quad tern_pvh_pd + 0x67
    .quad tern_pvh_pd + 0x1067
    .quad tern_pvh_pd + 0x2067
    .quad tern_pvh_pd + 0x3067
    .fill 508, 8, 0
tern_pvh_pd:
    .set tern_pd_addr, 0
    .rept 2048
    .quad tern_pd_addr + 0xe7          // P | RW | U/S | A | D | PS
    .set tern_pd_addr, tern_pd_addr + 0x200000
    .endr
"#,
    kcs = const layout::SEL_KERNEL_CS,
    uds = const layout::SEL_USER_DS,
    ucs = const layout::SEL_USER_CS,
    stack0 = const layout::stack_top(0),
    rflags = const layout::ENTRY_RFLAGS,
    magic = const layout::ENTRY_MAGIC_PVH,
    g0 = const layout::GDT_ENTRIES[0],
    g1 = const layout::GDT_ENTRIES[1],
    g2 = const layout::GDT_ENTRIES[2],
    g3 = const layout::GDT_ENTRIES[3],
    g4 = const layout::GDT_ENTRIES[4],
    g5 = const layout::GDT_ENTRIES[5],
    options(att_syntax)
);
