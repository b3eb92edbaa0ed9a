// Command jwtauth is an FFI runtime that authenticates requests with a JSON Web Token, using
// github.com/golang-jwt/jwt. Used with the ffi plugin:
//
//	plugins:
//	  ffi:
//	    lib: ffi_go_jwtauth
//	    cfg: '{"secret": "my-hmac-secret", "issuer": "polygate-demo"}'
//
// It reads "Authorization: Bearer <token>", verifies the HS256 signature, expiry and issuer,
// and then either forwards the request with x-user (the "sub" claim) and x-user-role headers,
// or answers 401 with a JSON error.
//
//	go build -buildmode=c-shared -o libffi_go_jwtauth.so ./jwtauth
package main

import (
	"encoding/json"
	"errors"
	"strings"

	"github.com/golang-jwt/jwt/v5"
	"polygate.dev/ffi"
)

type config struct {
	Secret string `json:"secret"`
	Issuer string `json:"issuer"`
}

type request struct {
	Headers map[string]any `json:"headers"`
}

func header(r *request, name string) string {
	switch v := r.Headers[name].(type) {
	case string:
		return v
	case []any:
		if len(v) > 0 {
			s, _ := v[0].(string)
			return s
		}
	}
	return ""
}

func deny(msg string) []byte {
	body, _ := json.Marshal(map[string]string{"message": msg})
	out, _ := json.Marshal(map[string]any{
		"action":  "respond",
		"status":  401,
		"headers": map[string]string{"content-type": "application/json", "www-authenticate": "Bearer"},
		"body":    string(body) + "\n",
	})
	return out
}

func init() {
	ffi.Handle("", func(cfg string) (ffi.Handler, ffi.Options, error) {
		var c config
		if err := json.Unmarshal([]byte(cfg), &c); err != nil {
			return nil, ffi.Options{}, err
		}
		if c.Secret == "" {
			return nil, ffi.Options{}, errors.New("cfg.secret is required")
		}
		opts := []jwt.ParserOption{jwt.WithValidMethods([]string{"HS256"}), jwt.WithExpirationRequired()}
		if c.Issuer != "" {
			opts = append(opts, jwt.WithIssuer(c.Issuer))
		}
		parser := jwt.NewParser(opts...)
		key := []byte(c.Secret)
		return func(req []byte) (int, []byte) {
			var r request
			if err := json.Unmarshal(req, &r); err != nil {
				return 1, []byte("bad request description: " + err.Error())
			}
			auth := header(&r, "authorization")
			token, ok := strings.CutPrefix(auth, "Bearer ")
			if !ok || token == "" {
				return 0, deny("missing bearer token")
			}
			claims := jwt.MapClaims{}
			if _, err := parser.ParseWithClaims(token, claims, func(*jwt.Token) (any, error) { return key, nil }); err != nil {
				return 0, deny("invalid token: " + err.Error())
			}
			sub, _ := claims.GetSubject()
			role, _ := claims["role"].(string)
			out, _ := json.Marshal(map[string]any{
				"action":         "continue",
				"set_headers":    map[string]string{"x-user": sub, "x-user-role": role},
				"remove_headers": []string{"authorization"},
			})
			return 0, out
		}, ffi.Options{Pollers: 2}, nil
	})
}

func main() {}
