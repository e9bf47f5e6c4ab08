// A Go program using libsglang through cgo.
//
//	CGO_CFLAGS=-I$PWD/include CGO_LDFLAGS="-L$PWD/target/release -lsglang" go build -o example ./ffi/examples/go
//	./example MODEL_DIR "PROMPT" MAX_NEW_TOKENS
package main

/*
#cgo LDFLAGS: -lsglang
#include <stdlib.h>
#include "sglang.h"

// The stream callback must be a C function; it forwards to the exported Go one.
extern int goOnChunk(sglang_chunk *chunk, void *user);
static int on_chunk(const sglang_chunk *chunk, void *user) { return goOnChunk((sglang_chunk *)chunk, user); }
static sglang_stream_callback stream_callback(void) { return on_chunk; }
*/
import "C"

import (
	"fmt"
	"os"
	"runtime/cgo"
	"strconv"
	"strings"
	"unsafe"
)

type streamState struct {
	text   strings.Builder
	chunks int
}

//export goOnChunk
func goOnChunk(chunk *C.sglang_chunk, user unsafe.Pointer) C.int {
	s := cgo.Handle(uintptr(user)).Value().(*streamState)
	s.text.WriteString(C.GoStringN(chunk.text, C.int(chunk.text_len)))
	s.chunks++
	return 0
}

func check(what string, st C.sglang_status) {
	if st != C.SGLANG_OK {
		fmt.Fprintf(os.Stderr, "%s failed (status %d): %s\n", what, int(st), C.GoString(C.sglang_last_error()))
		os.Exit(1)
	}
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintf(os.Stderr, "usage: %s MODEL_DIR PROMPT MAX_NEW_TOKENS\n", os.Args[0])
		os.Exit(2)
	}
	check("version check", C.sglang_check_version(C.SGLANG_VERSION_MAJOR, C.SGLANG_VERSION_MINOR))
	maxNew, err := strconv.Atoi(os.Args[3])
	if err != nil {
		fmt.Fprintln(os.Stderr, "MAX_NEW_TOKENS:", err)
		os.Exit(2)
	}
	path := C.CString(os.Args[1])
	defer C.free(unsafe.Pointer(path))
	ep := C.sglang_engine_default_params()
	ep.model_path = path
	ep.max_total_tokens = 4096
	var engine *C.sglang_engine
	check("sglang_engine_create", C.sglang_engine_create(&ep, &engine))
	defer C.sglang_engine_free(engine)

	prompt := C.CString(os.Args[2])
	defer C.free(unsafe.Pointer(prompt))
	rp := C.sglang_request_default_params()
	rp.text = prompt
	rp.max_new_tokens = C.int32_t(maxNew)
	rp.temperature = 0

	var result *C.sglang_result
	check("sglang_generate", C.sglang_generate(engine, &rp, &result))
	tokens := unsafe.Slice(result.tokens, result.n_tokens)
	text := C.GoStringN(result.text, C.int(result.text_len))
	fmt.Print("TOKENS")
	for _, t := range tokens {
		fmt.Printf(" %d", int32(t))
	}
	fmt.Printf("\nFINISH %d\nTEXT_BEGIN\n%s\nTEXT_END\n", int(result.finish_reason), text)
	C.sglang_result_free(result)

	state := &streamState{}
	h := cgo.NewHandle(state)
	defer h.Delete()
	check("sglang_generate_stream", C.sglang_generate_stream(engine, &rp, C.stream_callback(), unsafe.Pointer(uintptr(h)), nil))
	fmt.Printf("STREAM_CHUNKS %d\nSTREAM_BEGIN\n%s\nSTREAM_END\n", state.chunks, state.text.String())
	if state.text.String() != text {
		os.Exit(3)
	}
}
