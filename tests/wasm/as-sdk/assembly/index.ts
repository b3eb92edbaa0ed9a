// polygate's third-party compatibility case: a response-header filter written against the
// published AssemblyScript proxy-wasm SDK (@solo-io/proxy-runtime 0.1.8), used the way its
// documentation shows: a root context registered under a name (the plugin's root id) that
// creates one context per request.
//
// SDK 0.1.8's own RootContext.onConfigure passes the configuration size where the SDK's
// size pointer belongs (fixed upstream after 0.1.8, never published): a host that writes the
// size as the ABI says then writes 4 bytes at guest address <size>, corrupting the guest's
// memory. As the SDK's later fix does, this root reads its configuration with the SDK's own
// get_buffer_bytes instead (docs/wasm.md, "AssemblyScript SDK 0.1.8").
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  stream_context,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

class StampRoot extends RootContext {
  conf: string = "";

  onConfigure(configuration_size: u32): bool {
    this.conf = String.UTF8.decode(
      get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size),
    );
    return true;
  }

  createContext(context_id: u32): Context {
    return new Stamp(context_id, this);
  }
}

class Stamp extends Context {
  constructor(context_id: u32, root: StampRoot) {
    super(context_id, root);
  }

  onResponseHeaders(_headers: u32, _end_of_stream: bool): FilterHeadersStatusValues {
    const root = this.root_context as StampRoot;
    if (root.conf == "") {
      stream_context.headers.response.add("x-as-sdk", "default");
    } else {
      stream_context.headers.response.add("x-as-sdk", root.conf);
    }
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => new StampRoot(context_id), "as_sdk_add_header");
