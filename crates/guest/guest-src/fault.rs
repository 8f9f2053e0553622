//! PVH entry only: an IDT and a TSS so that a CPU exception prints
//! `#FAULT vector=0x.. error=0x.. rip=0x.. rsp=0x..` on COM1 and halts the vCPU, instead of a
//! silent triple fault (QEMU with `-no-reboot` just exits). The handler runs at CPL 0, i.e.
//! emulated on PVM, so it is a few hundred instructions of plain asm (no compiled Rust, whose
//! SSE the instruction emulator may not know). Under the Tern direct entry the VMM sees a guest
//! fault itself.

use crate::layout;

/// The TSS descriptor takes the two GDT slots right after `GDT_ENTRIES` (see entry.rs).
const SEL_TSS: u16 = (layout::GDT_ENTRIES.len() * 8) as u16;
/// Ports the I/O bitmap allows from CPL 3 (COM1, the PIT and port 0x61 are below). PVM checks
/// the bitmap even with IOPL 3: without it, the first `in`/`out` at CPL 3 is a #GP.
const IO_PORTS: u64 = 0x400;
/// TSS limit: 104 bytes of TSS, the bitmap, its 0xff terminator.
const TSS_LIMIT: u64 = 104 + IO_PORTS / 8 + 1 - 1;
/// vCPU 0's stats `STATE` field, set to `STATE_PANICKED` by the handler.
const STATE_ADDR: u64 = layout::stats_addr(0) + layout::stats_off::STATE;

core::arch::global_asm!(
    r#"
    .section .text.tern_fault, "ax"
    .code64

    // Called at CPL 0 by the PVH entry before it drops to CPL 3: writes the TSS descriptor into
    // the GDT, fills the 32 IDT gates, loads IDTR and TR. Clobbers rax, rcx, rdx, rsi, rdi.
    .globl tern_pvh_fault_setup
tern_pvh_fault_setup:
    movl $tern_tss, %eax
    // Low qword: limit | base[23:0] << 16 | 0x89 (present, 64-bit TSS) << 40 | base[31:24] << 56.
    movl %eax, %edx
    andl $0xffffff, %edx
    shlq $16, %rdx
    orq ${tss_limit}, %rdx
    movabsq $0x0000890000000000, %rcx
    orq %rcx, %rdx
    movl %eax, %ecx
    shrl $24, %ecx
    shlq $56, %rcx
    orq %rcx, %rdx
    movq %rdx, tern_gdt_tss
    movq $0, tern_gdt_tss + 8          // base[63:32] = 0: the image is below 4 GiB
    movl $tern_idt, %edi
    movl $tern_fault_stubs, %esi       // stub i at tern_fault_stubs + 16 * i
    movl $32, %ecx
1:  movl %esi, %eax
    movw %ax, (%rdi)                   // offset[15:0]
    movw ${kcs}, 2(%rdi)               // kernel code selector
    movw $0x8e00, 4(%rdi)              // present, DPL 0, 64-bit interrupt gate, IST 0
    shrl $16, %eax
    movw %ax, 6(%rdi)                  // offset[31:16]
    movq $0, 8(%rdi)                   // offset[63:32] = 0
    addl $16, %esi
    addq $16, %rdi
    decl %ecx
    jnz 1b
    lidt tern_idt_ptr
    movw ${tss}, %ax
    ltr %ax
    ret

    // One 16-byte stub per vector: push a 0 error code where the CPU pushes none, then the
    // vector number.
    .balign 16
tern_fault_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushq $0
    .endif
    pushq $\vec
    jmp tern_fault_common
    .endr

    // Frame: 0 vector, 8 error code, 16 rip, 24 cs, 32 rflags, 40 rsp, 48 ss.
tern_fault_common:
    movq %rsp, %rbx
    movl $tern_fault_text_vector, %esi
    call tern_fault_str
    movq (%rbx), %rsi
    shlq $56, %rsi
    movl $2, %ecx
    call tern_fault_hex
    movl $tern_fault_text_error, %esi
    call tern_fault_str
    movq 8(%rbx), %rsi
    movl $16, %ecx
    call tern_fault_hex
    movl $tern_fault_text_rip, %esi
    call tern_fault_str
    movq 16(%rbx), %rsi
    movl $16, %ecx
    call tern_fault_hex
    movl $tern_fault_text_rsp, %esi
    call tern_fault_str
    movq 40(%rbx), %rsi
    movl $16, %ecx
    call tern_fault_hex
    movl $tern_fault_text_end, %esi
    call tern_fault_str
    movq ${panicked}, {state}
2:  hlt
    jmp 2b

    // Prints the top %ecx hex digits of %rsi on COM1. Clobbers rax, rcx, rdx, rsi.
tern_fault_hex:
1:  rolq $4, %rsi
    movl %esi, %eax
    andl $15, %eax
    movb tern_fault_digits(%rax), %al
    movw ${com1}, %dx
    outb %al, %dx
    decl %ecx
    jnz 1b
    ret

    // Prints the NUL-terminated string at %rsi on COM1. Clobbers rax, rdx, rsi.
tern_fault_str:
1:  movb (%rsi), %al
    testb %al, %al
    jz 2f
    movw ${com1}, %dx
    outb %al, %dx
    incq %rsi
    jmp 1b
2:  ret

    .section .rodata.tern_fault, "a"
tern_fault_digits:
    .ascii "0123456789abcdef"
tern_fault_text_vector:
    .asciz "\n#FAULT vector=0x"
tern_fault_text_error:
    .asciz " error=0x"
tern_fault_text_rip:
    .asciz " rip=0x"
tern_fault_text_rsp:
    .asciz " rsp=0x"
tern_fault_text_end:
    .asciz "\n"

    .section .data.tern_fault, "aw"
    .balign 16
tern_idt:
    .fill 64, 8, 0                     // 32 gates of 16 bytes
tern_idt_ptr:
    .word 32 * 16 - 1
    .quad tern_idt
    .balign 16
tern_tss:                              // 64-bit TSS, 104 bytes, then the I/O bitmap
    .long 0
    .quad tern_fault_stack_top         // RSP0: the stack a fault at CPL 3 switches to
    .fill 11, 8, 0                     // RSP1, RSP2, reserved, IST1..7, reserved
    .word 0
    .word 104                          // I/O bitmap offset
    .fill {iobm_bytes}, 1, 0           // ports 0..IO_PORTS: allowed
    .byte 0xff                         // the CPU reads 2 bytes; ports beyond: denied
    .balign 16
    .fill 1024, 1, 0
tern_fault_stack_top:
"#,
    kcs = const layout::SEL_KERNEL_CS,
    tss = const SEL_TSS,
    tss_limit = const TSS_LIMIT,
    iobm_bytes = const IO_PORTS / 8,
    com1 = const layout::COM1,
    panicked = const layout::STATE_PANICKED,
    state = const STATE_ADDR,
    options(att_syntax)
);
