/* LD_PRELOAD for the host qemu-aarch64 of .ci/arm64_count.sh: qemu 7.2 line-buffers its log and
 * fflush()es it after every entry, i.e. one write(2) per executed block: three quarters of the
 * run time.  This keeps the log file (any stream but stdin/out/err) fully buffered; exit()
 * still flushes it.  The guest must not see it: run qemu with -U LD_PRELOAD. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

int fflush(FILE *f) {
  static int (*real)(FILE *);
  if (!real) real = (int (*)(FILE *))dlsym(RTLD_NEXT, "fflush");
  if (f && fileno(f) > 2) return 0;
  return real(f);
}

int setvbuf(FILE *f, char *buf, int mode, size_t size) {
  static int (*real)(FILE *, char *, int, size_t);
  if (!real) real = (int (*)(FILE *, char *, int, size_t))dlsym(RTLD_NEXT, "setvbuf");
  if (f && fileno(f) > 2 && mode == _IOLBF) {
    mode = _IOFBF;
    buf = NULL;
    size = 1 << 20;
  }
  return real(f, buf, mode, size);
}
