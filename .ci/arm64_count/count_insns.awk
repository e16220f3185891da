# Guest instructions executed between the first two getppid() system calls of a qemu-aarch64
# log written with  -d nochain,exec,in_asm,strace  (count_driver marks its counted call so).
#
# in_asm prints each translation block once, when it is translated ("IN:" and one line per
# guest instruction); the block's first execution follows at once as a "Trace" line naming the
# block's host code address ($3), and every later execution repeats that line (nochain: no block
# jumps straight into the next one unlogged).  So the instructions executed are the sum over
# Trace lines of their block's length.  A block translated again (after a flush) gets a new IN:
# before its next Trace, which updates the length.
#
# Prints: instructions, blocks executed, Trace lines of unknown length (must be 0), markers seen.
/^IN:/ { in_block = 1; n = 0; next }
in_block && /^0x/ { n++; next }
/^Trace/ {
  if (in_block) { len[$3] = n; in_block = 0 }
  if (marks == 1) {
    if (!($3 in len)) unknown++
    insns += len[$3]
    blocks++
  }
  next
}
/ getppid\(/ { marks++; next }
END { printf "%d %d %d %d\n", insns, blocks, unknown + 0, marks + 0 }
