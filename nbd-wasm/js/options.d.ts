// Types of options.js: declared in index.d.ts.
export { OPTION_NAMES, describeOption, OptionReader } from "./index.js";
