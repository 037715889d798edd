/* A firmware program that runs a model built by `edgecomp build MODEL --emit firmware`, using only
 * the generated header and the CMake package (see CMakeLists.txt beside this file).
 *
 *   run_model INPUTS.bin OUTPUTS.bin [WEIGHTS_FILE]
 *
 * INPUTS.bin holds N samples back to back, each the model's inputs in order (raw, row-major, in
 * their dtypes); OUTPUTS.bin receives N samples of the outputs the same way. The weights come from
 * WEIGHTS_FILE, or are linked into the program when built with EDGECOMP_LINKED.
 *
 * The model's name is a compile definition (EDGECOMP_MODEL=digits_cnn): the API is
 * digits_cnn_create, digits_cnn_run, ... and API(run) below spells that name.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include EDGECOMP_MODEL_HEADER

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define API(fn) CAT(EDGECOMP_MODEL, CAT(_, fn))
#define COUNT(array) (sizeof(array) / sizeof((array)[0]))

static size_t total_bytes(const edgecomp_tensor_info* infos, size_t n) {
  size_t sum = 0;
  for (size_t i = 0; i < n; ++i) sum += infos[i].nbytes;
  return sum;
}

static unsigned char* read_file(const char* path, size_t* size) {
  FILE* f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char* data = malloc(n > 0 ? (size_t)n : 1);
  if (data && fread(data, 1, (size_t)n, f) != (size_t)n) {
    free(data);
    data = NULL;
  }
  fclose(f);
  *size = (size_t)n;
  return data;
}

int main(int argc, char** argv) {
  const size_t n_in = COUNT(API(inputs)), n_out = COUNT(API(outputs));
  const size_t in_bytes = total_bytes(API(inputs), n_in), out_bytes = total_bytes(API(outputs), n_out);
  if (argc < 3) {
    fprintf(stderr, "usage: %s INPUTS.bin OUTPUTS.bin [WEIGHTS_FILE]\n", argv[0]);
    return 2;
  }
  size_t size = 0;
  unsigned char* inputs = read_file(argv[1], &size);
  if (!inputs || size == 0 || size % in_bytes != 0) {
    fprintf(stderr, "%s: expected a multiple of %zu bytes (one sample of the inputs)\n", argv[1], in_bytes);
    return 2;
  }
  const size_t samples = size / in_bytes;

  API(model)* model = NULL;
#ifdef EDGECOMP_LINKED
  int rc = API(create_linked)(&model);
#else
  if (argc < 4) {
    fprintf(stderr, "give the weights file (or build with EDGECOMP_LINKED)\n");
    return 2;
  }
  int rc = API(create)(argv[3], &model);
#endif
  if (rc != EDGECOMP_OK) {
    fprintf(stderr, "create failed (%d): %s\n", rc, API(last_error)());
    return 1;
  }

  unsigned char* outputs = malloc(samples * out_bytes);
  FILE* out = fopen(argv[2], "wb");
  if (!outputs || !out) {
    fprintf(stderr, "%s: cannot write\n", argv[2]);
    return 2;
  }
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (size_t s = 0; s < samples; ++s) {
    const void* in_ptrs[COUNT(API(inputs))];
    void* out_ptrs[COUNT(API(outputs))];
    size_t off = s * in_bytes;
    for (size_t i = 0; i < n_in; off += API(inputs)[i].nbytes, ++i) in_ptrs[i] = inputs + off;
    off = s * out_bytes;
    for (size_t i = 0; i < n_out; off += API(outputs)[i].nbytes, ++i) out_ptrs[i] = outputs + off;
    rc = API(run)(model, in_ptrs, out_ptrs);
    if (rc != EDGECOMP_OK) {
      fprintf(stderr, "run failed on sample %zu (%d): %s\n", s, rc, API(last_error)());
      return 1;
    }
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  fwrite(outputs, 1, samples * out_bytes, out);
  fclose(out);
  double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
  printf("%zu samples, %.3f ms per sample, first output %s\n", samples, ms / samples, API(outputs)[0].name);
  API(destroy)(model);
  free(outputs);
  free(inputs);
  return 0;
}
