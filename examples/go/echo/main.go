// Command echo is an FFI runtime that answers each request with its own bytes.
//
//	go build -buildmode=c-shared -o libffi_go_echo.so ./echo
//
// Other behaviours, chosen by cfg, answer the ffi plugin's request description:
//
//	continue        continue unchanged (an empty answer): the cheapest plugin round trip
//	action          continue, adding an x-go-echo header with the request path
//	rewrite:<uri>   continue with the upstream URI replaced
//	deny            respond 403
//	describe        respond 200 with the request description it received (JSON)
//	fail            answer rc 3 (an error)
//	hang            never answer
//	logto:<file>    append "<status> <path>" lines (for the log phase)
//	deadline        answer the time the caller still waits ("remaining <ms>" or "no deadline")
//	cancel:<file>   wait until the caller gives up, then append "cancelled <request>" (the
//	                handler sees the cancellation through its context)
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"

	"polygate.dev/ffi"
)

type doc struct {
	Path   string `json:"path"`
	Status int    `json:"status"`
}

func action(v map[string]any) []byte {
	out, _ := json.Marshal(v)
	return out
}

func init() {
	ffi.Handle("", func(cfg string) (ffi.Handler, ffi.Options, error) {
		// one poller: these handlers answer at once, and each extra poller parks on the queue's
		// descriptor too and wakes with the others on each post (more Go CPU per request)
		opts := ffi.Options{}
		switch {
		case cfg == "continue":
			return func(req []byte) (int, []byte) { return 0, nil }, opts, nil
		case cfg == "action":
			return func(req []byte) (int, []byte) {
				var d doc
				if err := json.Unmarshal(req, &d); err != nil {
					return 1, []byte(err.Error())
				}
				return 0, action(map[string]any{"action": "continue", "set_headers": map[string]string{"x-go-echo": d.Path}})
			}, opts, nil
		case strings.HasPrefix(cfg, "rewrite:"):
			uri := strings.TrimPrefix(cfg, "rewrite:")
			return func(req []byte) (int, []byte) {
				return 0, action(map[string]any{"action": "continue", "uri": uri, "response_headers": map[string]string{"x-rewritten": "1"}})
			}, opts, nil
		case cfg == "deny":
			return func(req []byte) (int, []byte) {
				return 0, action(map[string]any{"action": "respond", "status": 403, "headers": map[string]string{"x-denied-by": "go"}, "body": "denied by a Go runtime\n"})
			}, opts, nil
		case cfg == "describe":
			return func(req []byte) (int, []byte) {
				return 0, action(map[string]any{"action": "respond", "status": 200, "headers": map[string]string{"content-type": "application/json"}, "body": string(req)})
			}, opts, nil
		case cfg == "fail":
			return func(req []byte) (int, []byte) { return 3, []byte("something broke") }, opts, nil
		case strings.HasPrefix(cfg, "logto:"):
			path := strings.TrimPrefix(cfg, "logto:")
			var mu sync.Mutex
			return func(req []byte) (int, []byte) {
				var d doc
				_ = json.Unmarshal(req, &d)
				mu.Lock()
				defer mu.Unlock()
				f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
				if err != nil {
					return 1, []byte(err.Error())
				}
				defer f.Close()
				fmt.Fprintf(f, "%d %s\n", d.Status, d.Path)
				return 0, nil
			}, opts, nil
		}
		return func(req []byte) (int, []byte) { return 0, req }, opts, nil
	})
	ffi.HandleTask("deadline", func(string) (ffi.TaskHandler, ffi.Options, error) {
		return func(t *ffi.Task) (int, []byte) {
			if d, ok := t.Remaining(); ok {
				return 0, []byte(fmt.Sprintf("remaining %d", d.Milliseconds()))
			}
			return 0, []byte("no deadline")
		}, ffi.Options{}, nil
	})
	ffi.HandleTask("cancel", func(path string) (ffi.TaskHandler, ffi.Options, error) {
		var mu sync.Mutex
		return func(t *ffi.Task) (int, []byte) {
			ctx := t.Context()
			<-ctx.Done()
			mu.Lock()
			defer mu.Unlock()
			f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
			if err != nil {
				return 1, []byte(err.Error())
			}
			defer f.Close()
			fmt.Fprintf(f, "cancelled %s (%v)\n", t.Request(), ctx.Err())
			return 1, []byte("cancelled")
		}, ffi.Options{}, nil
	})
	// "hang" registers no handler: requests are taken and never answered
	ffi.HandleAsync("hang", func(string) (ffi.AsyncHandler, ffi.Options, error) {
		return func(req []byte, respond func(int, []byte)) {}, ffi.Options{}, nil
	})
}

func main() {}
