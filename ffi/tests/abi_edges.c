/*
 * The C ABI's sharp edges, tried from C (ffi/tests/examples.rs builds and runs this):
 * struct sizes that end inside a field, an absurd max_total_tokens, an unknown dtype, a prompt given twice,
 * last_error after a success, and an engine used in a fork()ed child.
 * Usage: abi_edges MODEL_DIR. Prints "ok: ..." per check; exits non-zero at the first failure.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sglang.h"

static int failed = 0;

static void check(int cond, const char *what) {
    if (cond) {
        printf("ok: %s\n", what);
    } else {
        printf("FAILED: %s (last error: %s)\n", what, sglang_last_error());
        failed = 1;
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL_DIR\n", argv[0]);
        return 2;
    }
    sglang_engine *engine = NULL;
    sglang_engine_params ep = sglang_engine_default_params();
    ep.model_path = argv[1];
    ep.max_total_tokens = 1024;

    /* a struct_size ending inside `model_path` */
    ep.struct_size = 12;
    check(sglang_engine_create(&ep, &engine) == SGLANG_ERR_INVALID_ARGUMENT && engine == NULL,
          "engine struct_size 12 is refused");
    check(strstr(sglang_last_error(), "struct_size") != NULL, "the message names struct_size");
    ep.struct_size = sizeof ep;

    /* 2^58 tokens of KV cache: a validation error, not a wrapped allocation */
    ep.max_total_tokens = (int64_t)1 << 58;
    check(sglang_engine_create(&ep, &engine) == SGLANG_ERR_INVALID_ARGUMENT && engine == NULL,
          "max_total_tokens 2^58 is refused");
    check(strstr(sglang_last_error(), "max-total-tokens") != NULL,
          "the message names max_total_tokens");
    ep.max_total_tokens = 1024;

    /* ABI 1.4's dtype: a value the library does not know is refused by name */
    ep.dtype = "float16";
    check(sglang_engine_create(&ep, &engine) == SGLANG_ERR_INVALID_ARGUMENT && engine == NULL,
          "dtype float16 is refused");
    check(strstr(sglang_last_error(), "params.dtype") != NULL, "the message names dtype");
    /* the engine below: bf16 activations and a bf16 KV cache, as --dtype and --kv-cache-dtype */
    ep.dtype = "bfloat16";
    ep.kv_cache_dtype = "bf16";

    if (sglang_engine_create(&ep, &engine) != SGLANG_OK) {
        printf("FAILED: engine: %s\n", sglang_last_error());
        return 1;
    }
    check(sglang_last_error()[0] == '\0', "a successful call clears last_error");

    sglang_request_params rp = sglang_request_default_params();
    rp.text = "Hello";
    rp.max_new_tokens = 2;
    rp.temperature = 0;
    sglang_result *r = NULL;

    rp.struct_size = 12;
    check(sglang_generate(engine, &rp, &r) == SGLANG_ERR_INVALID_ARGUMENT && r == NULL,
          "request struct_size 12 is refused");
    rp.struct_size = sizeof rp;

    int32_t ids[1] = {1};
    rp.tokens = ids; /* n_tokens stays 0: still two prompts */
    check(sglang_generate(engine, &rp, &r) == SGLANG_ERR_INVALID_ARGUMENT && r == NULL,
          "text with non-NULL tokens is refused");
    rp.tokens = NULL;

    rp.top_k = 0; /* documented as "disabled", like -1 */
    check(sglang_generate(engine, &rp, &r) == SGLANG_OK && r != NULL, "top_k 0 generates");
    check(sglang_last_error()[0] == '\0', "last_error is empty after the success");
    sglang_result_free(r);
    r = NULL;

    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        alarm(20); /* a hang is a failure, not a stuck test */
        int ok = sglang_generate(engine, &rp, &r) == SGLANG_ERR_ENGINE_STOPPED && r == NULL;
        ok = ok && strstr(sglang_last_error(), "fork") != NULL;
        int32_t tok[8];
        ok = ok && sglang_tokenize(engine, "Hello", 1, tok, 8) == SGLANG_TOKENIZE_ERROR;
        sglang_request *req = NULL;
        ok = ok && sglang_request_start(engine, &rp, &req) == SGLANG_ERR_ENGINE_STOPPED;
        sglang_engine_free(engine); /* returns at once in the child */
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    waitpid(child, &status, 0);
    check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "a forked child gets SGLANG_ERR_ENGINE_STOPPED instead of hanging");

    /* a request started before fork(): the child may not wait on it */
    sglang_request *req = NULL;
    check(sglang_request_start(engine, &rp, &req) == SGLANG_OK, "request started");
    fflush(stdout);
    child = fork();
    if (child == 0) {
        alarm(20);
        sglang_chunk chunk;
        int ok = sglang_request_next(req, &chunk) == SGLANG_ERR_ENGINE_STOPPED;
        sglang_request_free(req);
        _exit(ok ? 0 : 1);
    }
    waitpid(child, &status, 0);
    check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "a request inherited by a forked child is refused");
    sglang_chunk chunk;
    sglang_status st;
    while ((st = sglang_request_next(req, &chunk)) == SGLANG_OK &&
           chunk.finish_reason == SGLANG_FINISH_NONE) {
    }
    check(st == SGLANG_OK, "the parent's request still finishes");
    sglang_request_free(req);

    /* the parent's engine is untouched */
    check(sglang_generate(engine, &rp, &r) == SGLANG_OK && r != NULL && r->n_tokens == 2,
          "the parent still generates");
    sglang_result_free(r);
    sglang_engine_free(engine);
    return failed;
}
