package example;

import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.concurrent.CompletableFuture;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import polygate.ffi.Runtime;

/**
 * An {@code ffi} plugin that asks an HTTP service whether a request may pass, with
 * {@code java.net.http}: it POSTs the request description (JSON) to the URL given as the cfg's
 * third field; 200 lets the request through with {@code x-checked-by: java} and the service's
 * {@code x-user} header, anything else answers 403 with the service's body, and a service that
 * cannot be reached answers 503.
 *
 * <pre>
 * plugins:
 *   ffi: {lib: ffi_java, cfg: "example.HttpCheck,init,http://127.0.0.1:9100/check"}
 * </pre>
 */
public final class HttpCheck {
    private HttpCheck() {}

    private static final Pattern PATH = Pattern.compile("\"path\":\"((?:[^\"\\\\]|\\\\.)*)\"");

    /** The runtime's init: one HTTP client, calls made asynchronously. */
    public static int init(String cfg, long tq) {
        URI service = URI.create(cfg);
        HttpClient client = HttpClient.newBuilder()
                .connectTimeout(Duration.ofSeconds(2))
                .build();
        return Runtime.serveAsync(tq, task -> {
            String doc = task.requestString();
            Matcher m = PATH.matcher(doc);
            String path = m.find() ? m.group(1) : "/";
            HttpRequest req = HttpRequest.newBuilder(service.resolve(service.getPath() + "?path=" + encode(path)))
                    .timeout(Duration.ofSeconds(2))
                    .header("content-type", "application/json")
                    .POST(HttpRequest.BodyPublishers.ofString(doc))
                    .build();
            CompletableFuture<byte[]> out = client.sendAsync(req, HttpResponse.BodyHandlers.ofString())
                    .thenApply(resp -> {
                        if (resp.statusCode() == 200) {
                            String user = resp.headers().firstValue("x-user").orElse("");
                            return ("{\"action\":\"continue\",\"set_headers\":{\"x-checked-by\":\"java\",\"x-user\":"
                                    + quote(user) + "}}").getBytes();
                        }
                        return respond(403, resp.body()).getBytes();
                    })
                    .exceptionally(e -> respond(503, "check service unavailable: " + e.getCause()).getBytes());
            return out;
        });
    }

    private static String respond(int status, String body) {
        return "{\"action\":\"respond\",\"status\":" + status + ",\"body\":" + quote(body) + "}";
    }

    private static String encode(String s) {
        return java.net.URLEncoder.encode(s, java.nio.charset.StandardCharsets.UTF_8);
    }

    private static String quote(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (c < 0x20) {
                        b.append(String.format("\\u%04x", (int) c));
                    } else {
                        b.append(c);
                    }
            }
        }
        return b.append('"').toString();
    }
}
