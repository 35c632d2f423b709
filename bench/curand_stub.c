/* A stand-in for libcurand.so.10, for machines whose CUDA libraries lack cuRAND (recent
 * PyTorch wheels do not ship it). overopt-gpu-bench links cuRAND through candle but never
 * draws device random numbers: creating a generator and setting its seed or stream succeed,
 * every generate call fails with CURAND_STATUS_INITIALIZATION_FAILED (203).
 * Its symbols carry the version node of the real library (libcurand.so.10), as the binary asks.
 * Built by bench/build-gpu.sh; by hand: gcc -shared -fPIC -O2 -Wl,-soname,libcurand.so.10 -Wl,--version-script=curand_stub.map \
 *          -o bin/curand-stub/libcurand.so.10 curand_stub.c */
#include <stddef.h>

typedef int status_t;
enum { OK = 0, FAILED = 203 };
static int dummy_generator;

status_t curandCreateGenerator(void **gen, int type) { (void)type; *gen = &dummy_generator; return OK; }
status_t curandCreateGeneratorHost(void **gen, int type) { (void)type; *gen = &dummy_generator; return OK; }
status_t curandDestroyGenerator(void *gen) { (void)gen; return OK; }
status_t curandSetPseudoRandomGeneratorSeed(void *gen, unsigned long long seed) { (void)gen; (void)seed; return OK; }
status_t curandSetStream(void *gen, void *stream) { (void)gen; (void)stream; return OK; }
status_t curandSetGeneratorOffset(void *gen, unsigned long long off) { (void)gen; (void)off; return OK; }
status_t curandSetGeneratorOrdering(void *gen, int order) { (void)gen; (void)order; return OK; }
status_t curandSetQuasiRandomGeneratorDimensions(void *gen, unsigned int d) { (void)gen; (void)d; return OK; }
status_t curandGetVersion(int *v) { *v = 0; return OK; }
status_t curandGetProperty(int type, int *v) { (void)type; *v = 0; return OK; }
status_t curandGenerate(void) { return FAILED; }
status_t curandGenerateLongLong(void) { return FAILED; }
status_t curandGenerateUniform(void) { return FAILED; }
status_t curandGenerateUniformDouble(void) { return FAILED; }
status_t curandGenerateNormal(void) { return FAILED; }
status_t curandGenerateNormalDouble(void) { return FAILED; }
status_t curandGenerateLogNormal(void) { return FAILED; }
status_t curandGenerateLogNormalDouble(void) { return FAILED; }
status_t curandGeneratePoisson(void) { return FAILED; }
status_t curandGeneratePoissonMethod(void) { return FAILED; }
status_t curandGenerateSeeds(void) { return FAILED; }
status_t curandCreatePoissonDistribution(void) { return FAILED; }
status_t curandDestroyDistribution(void) { return OK; }
status_t curandGetDirectionVectors32(void) { return FAILED; }
status_t curandGetDirectionVectors64(void) { return FAILED; }
status_t curandGetScrambleConstants32(void) { return FAILED; }
status_t curandGetScrambleConstants64(void) { return FAILED; }
