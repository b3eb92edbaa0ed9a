# Shared by the bench scripts (sourced). upstream_conf DIR PORT writes DIR/upstream.conf: an
# nginx with one worker and the access log off, answering every request with 1 KiB.
upstream_conf() {
  local dir="$1" port="$2" body
  body="$(head -c 1024 /dev/zero | tr '\0' 'x')"
  cat > "$dir/upstream.conf" <<NGX
worker_processes 1; daemon off; pid $dir/up.pid; error_log $dir/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$port reuseport; location / { default_type text/plain; return 200 "$body"; } } }
NGX
}
