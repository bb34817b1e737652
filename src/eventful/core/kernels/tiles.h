// AMX tiles for the kernels of this folder that use them (bfloat16_attention.cpp,
// tiles_linear.cpp): whether the build has them (EVENTFUL_TILES: the compiler targets AMX-BF16
// and AVX512-BF16), the process's permission to use them, and the one tile layout both kernels
// use.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define EVENTFUL_TILES 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define EVENTFUL_TILES 0
#endif

namespace eventful_tiles {

#if EVENTFUL_TILES

// Every tile 16 rows of 64 bytes: 16 x 32 bfloat16, 16 x 16 float32 or 16 x 16 pairs. Each
// thread that runs tile instructions loads it first, and releases the tiles after.
inline void configure() {
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
  } config;
  std::memset(&config, 0, sizeof(config));
  config.palette = 1;
  for (int tile = 0; tile < 8; ++tile) {
    config.rows[tile] = 16;
    config.bytes_per_row[tile] = 64;
  }
  _tile_loadconfig(&config);
}

// Whether the kernel grants this process the tiles' state (once: Linux asks for it).
inline bool permitted() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                      18 /* XFEATURE_XTILEDATA */) == 0;
  return granted;
}

#endif  // EVENTFUL_TILES

}  // namespace eventful_tiles
