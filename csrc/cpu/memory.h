// Large fresh CPU outputs: ask Linux for transparent huge pages before the first touch.
//
// A fresh 500 MB gradient costs ~128k page faults at 4 KiB, as much time as the kernel itself
// (benchmarks/RESULTS.md, "Measured figures moved out of code comments"); with 2 MiB pages the
// kernel's first write is nearly free.
// Only a hint: a no-op where THP is disabled or not Linux.
#pragma once
#include <cstddef>
#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fastalign::cpu {

inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kMin = size_t(32) << 20;
  if (bytes < kMin) return;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<uintptr_t>(ptr) + page - 1) / page * page;
  const auto end = (reinterpret_cast<uintptr_t>(ptr) + bytes) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

}  // namespace fastalign::cpu
