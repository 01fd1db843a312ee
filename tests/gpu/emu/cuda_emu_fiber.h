/* cuda_emu_fiber.h — the emulator's fibers: a CUDA thread runs on its own stack and gives the CPU
 * back at barriers. x86-64 switches with six pushes and pops (no system call, unlike
 * swapcontext, which saves the signal mask: a million-thread kernel would spend seconds there);
 * other architectures use ucontext.
 * Invariants: fiber_init'ed fibers start in entry(), which must never return. */
#ifndef NR_CUDA_EMU_FIBER_H
#define NR_CUDA_EMU_FIBER_H

#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__)

typedef struct fiber {
   void *sp;
} fiber;

/* Saves the callee-saved registers and the FP control words on the current stack, stores the
 * stack pointer in from->sp and resumes to. */
extern "C" void nr_emu_fiber_switch(fiber *from, fiber *to);
__asm__(".text\n"
        ".globl nr_emu_fiber_switch\n"
        ".type nr_emu_fiber_switch,@function\n"
        "nr_emu_fiber_switch:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
        "  movq %rsp, (%rdi)\n"
        "  movq (%rsi), %rsp\n"
        "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size nr_emu_fiber_switch, .-nr_emu_fiber_switch\n");

static inline void fiber_switch(fiber *from, fiber *to) { nr_emu_fiber_switch(from, to); }

/* A stack laid out as if entry had been switched away from just before its first instruction. */
static inline void fiber_init(fiber *f, char *stack, size_t bytes, void (*entry)(void))
{
   uint64_t *top = (uint64_t *)(((uintptr_t)(stack + bytes)) & ~(uintptr_t)15);
   *--top = 0;                  /* entry's return address: never used */
   *--top = (uint64_t)entry;    /* where the switch's ret goes */
   for (int i = 0; i < 6; i++) *--top = 0; /* rbp rbx r12-r15 */
   uint32_t ctl[2];
   __asm__ volatile("stmxcsr %0\n fnstcw %1" : "=m"(ctl[0]), "=m"(ctl[1]));
   uint64_t words;
   __builtin_memcpy(&words, ctl, 8);
   *--top = words;
   f->sp = top;
}

#else

#include <ucontext.h>

typedef struct fiber {
   ucontext_t uc;
} fiber;
static inline void fiber_switch(fiber *from, fiber *to) { swapcontext(&from->uc, &to->uc); }
static inline void fiber_init(fiber *f, char *stack, size_t bytes, void (*entry)(void))
{
   getcontext(&f->uc);
   f->uc.uc_stack.ss_sp = stack;
   f->uc.uc_stack.ss_size = bytes;
   f->uc.uc_link = NULL;
   makecontext(&f->uc, entry, 0);
}

#endif
#endif
