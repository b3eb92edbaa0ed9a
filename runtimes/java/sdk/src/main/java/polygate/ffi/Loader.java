package polygate.ffi;

import java.io.File;
import java.lang.reflect.Method;
import java.net.MalformedURLException;
import java.net.URL;
import java.net.URLClassLoader;
import java.util.ArrayList;
import java.util.List;

/**
 * Loads a runtime class in a fresh child-first class loader, so a class rebuilt on disk is
 * picked up by the next load after an unload ({@code "pkg.Class?,init,rest"}; the loader calls
 * {@link #init} with the whole cfg). Classes of {@code polygate.ffi} and of the JDK always come
 * from the parent (the natives are registered there).
 */
public final class Loader {
    private Loader() {}

    /** Loads {@code pkg.Class} of cfg "pkg.Class?,method,rest" and calls method(rest, tq). */
    public static int init(String cfg, long tq) throws Exception {
        String[] parts = cfg.split(",", 3);
        if (parts.length < 2) {
            throw new IllegalArgumentException("cfg " + cfg + ": expected pkg.Class?,method[,rest]");
        }
        String cls = parts[0].endsWith("?") ? parts[0].substring(0, parts[0].length() - 1) : parts[0];
        String rest = parts.length == 3 ? parts[2] : "";
        ClassLoader cl = new ChildFirst(classPath(), Loader.class.getClassLoader());
        Class<?> c = Class.forName(cls, true, cl);
        Method m = c.getMethod(parts[1], String.class, long.class);
        Object rc = m.invoke(null, rest, tq);
        return rc instanceof Integer ? (Integer) rc : 1;
    }

    private static URL[] classPath() throws MalformedURLException {
        List<URL> urls = new ArrayList<>();
        for (String p : System.getProperty("java.class.path", "").split(File.pathSeparator)) {
            if (!p.isEmpty()) {
                urls.add(new File(p).toURI().toURL());
            }
        }
        return urls.toArray(new URL[0]);
    }

    private static final class ChildFirst extends URLClassLoader {
        ChildFirst(URL[] urls, ClassLoader parent) {
            super(urls, parent);
        }

        @Override
        protected Class<?> loadClass(String name, boolean resolve) throws ClassNotFoundException {
            synchronized (getClassLoadingLock(name)) {
                if (name.startsWith("java.") || name.startsWith("javax.") || name.startsWith("jdk.")
                        || name.startsWith("sun.") || name.startsWith("polygate.ffi.")) {
                    return super.loadClass(name, resolve);
                }
                Class<?> c = findLoadedClass(name);
                if (c == null) {
                    try {
                        c = findClass(name);
                    } catch (ClassNotFoundException e) {
                        c = super.loadClass(name, resolve);
                    }
                }
                if (resolve) {
                    resolveClass(c);
                }
                return c;
            }
        }
    }
}
