/* A C program using libsglang: load a model, generate greedily, then stream the same
 * generation and check the pieces add up.
 *
 *   gcc -std=c11 -Wall -Wextra -Werror -I include ffi/examples/c/main.c -L target/release -lsglang
 *   ./a.out MODEL_DIR "PROMPT" MAX_NEW_TOKENS
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sglang.h"

struct stream_state {
    char *text;
    size_t len;
    size_t chunks;
};

static int on_chunk(const sglang_chunk *chunk, void *user_data) {
    struct stream_state *s = (struct stream_state *)user_data;
    char *grown = realloc(s->text, s->len + chunk->text_len + 1);
    if (grown == NULL) {
        return 1; /* cancel */
    }
    s->text = grown;
    memcpy(s->text + s->len, chunk->text, chunk->text_len);
    s->len += chunk->text_len;
    s->text[s->len] = '\0';
    s->chunks++;
    return 0;
}

static int fail(const char *what, sglang_status status) {
    fprintf(stderr, "%s failed (status %d): %s\n", what, (int)status, sglang_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL_DIR PROMPT MAX_NEW_TOKENS\n", argv[0]);
        return 2;
    }
    sglang_status st = SGLANG_CHECK_VERSION();
    if (st != SGLANG_OK) {
        return fail("version check", st);
    }
    sglang_engine_params ep = sglang_engine_default_params();
    ep.model_path = argv[1];
    ep.max_total_tokens = 4096;
    sglang_engine *engine = NULL;
    st = sglang_engine_create(&ep, &engine);
    if (st != SGLANG_OK) {
        return fail("sglang_engine_create", st);
    }

    sglang_request_params rp = sglang_request_default_params();
    rp.text = argv[2];
    rp.max_new_tokens = atoi(argv[3]);
    rp.temperature = 0.0f;

    sglang_result *result = NULL;
    st = sglang_generate(engine, &rp, &result);
    if (st != SGLANG_OK) {
        sglang_engine_free(engine);
        return fail("sglang_generate", st);
    }
    printf("TOKENS");
    for (size_t i = 0; i < result->n_tokens; i++) {
        printf(" %d", (int)result->tokens[i]);
    }
    printf("\nFINISH %d\nTEXT_BEGIN\n%s\nTEXT_END\n", (int)result->finish_reason, result->text);

    struct stream_state s = {NULL, 0, 0};
    st = sglang_generate_stream(engine, &rp, on_chunk, &s, NULL);
    if (st != SGLANG_OK) {
        free(s.text);
        sglang_result_free(result);
        sglang_engine_free(engine);
        return fail("sglang_generate_stream", st);
    }
    printf("STREAM_CHUNKS %zu\nSTREAM_BEGIN\n%s\nSTREAM_END\n", s.chunks, s.text ? s.text : "");
    int same = s.text != NULL && strcmp(s.text, result->text) == 0;
    free(s.text);
    sglang_result_free(result);
    sglang_engine_free(engine);
    return same ? 0 : 3;
}
