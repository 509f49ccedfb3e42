using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Backup.Block.Security;

/// <summary>
/// The few OpenSSL 3 calls TLS-PSK needs. .NET's SslStream sits on the same libssl but exposes no
/// pre-shared-key API, so <see cref="PskTlsStream"/> drives libssl itself through memory BIOs: the library
/// .NET already loads, not a second TLS implementation.
/// </summary>
internal static unsafe partial class LibSsl
{
    private const string Ssl = "libssl.so.3";
    private const string Crypto = "libcrypto.so.3";

    internal const int SSL_ERROR_NONE = 0;
    internal const int SSL_ERROR_WANT_READ = 2;
    internal const int SSL_ERROR_ZERO_RETURN = 6;

    private const int SSL_CTRL_SET_MIN_PROTO_VERSION = 123;
    private const long TLS1_2_VERSION = 0x0303;
    private const ulong SSL_OP_NO_TICKET = 1UL << 14;
    private const int BIO_CTRL_PENDING = 10;

    [LibraryImport(Ssl)]
    internal static partial nint TLS_server_method();

    [LibraryImport(Ssl)]
    internal static partial nint TLS_client_method();

    [LibraryImport(Ssl)]
    internal static partial nint SSL_CTX_new(nint method);

    [LibraryImport(Ssl)]
    internal static partial void SSL_CTX_free(nint ctx);

    [LibraryImport(Ssl)]
    private static partial long SSL_CTX_ctrl(nint ctx, int cmd, long larg, nint parg);

    [LibraryImport(Ssl)]
    private static partial ulong SSL_CTX_set_options(nint ctx, ulong options);

    [LibraryImport(Ssl)]
    private static partial int SSL_CTX_set_num_tickets(nint ctx, nuint count);

    [LibraryImport(Ssl, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int SSL_CTX_set_cipher_list(nint ctx, string ciphers);

    [LibraryImport(Ssl)]
    internal static partial void SSL_CTX_set_psk_server_callback(nint ctx, delegate* unmanaged[Cdecl]<nint, byte*, byte*, uint, uint> callback);

    [LibraryImport(Ssl)]
    internal static partial void SSL_CTX_set_psk_client_callback(nint ctx, delegate* unmanaged[Cdecl]<nint, byte*, byte*, uint, byte*, uint, uint> callback);

    [LibraryImport(Ssl)]
    internal static partial nint SSL_new(nint ctx);

    [LibraryImport(Ssl)]
    internal static partial void SSL_free(nint ssl);

    [LibraryImport(Ssl)]
    internal static partial void SSL_set_bio(nint ssl, nint rbio, nint wbio);

    [LibraryImport(Ssl)]
    internal static partial void SSL_set_accept_state(nint ssl);

    [LibraryImport(Ssl)]
    internal static partial void SSL_set_connect_state(nint ssl);

    [LibraryImport(Ssl)]
    internal static partial int SSL_do_handshake(nint ssl);

    [LibraryImport(Ssl)]
    internal static partial int SSL_read(nint ssl, byte* buffer, int count);

    [LibraryImport(Ssl)]
    internal static partial int SSL_write(nint ssl, byte* buffer, int count);

    [LibraryImport(Ssl)]
    internal static partial int SSL_shutdown(nint ssl);

    [LibraryImport(Ssl)]
    internal static partial int SSL_get_error(nint ssl, int ret);

    [LibraryImport(Ssl)]
    internal static partial int SSL_set_ex_data(nint ssl, int index, nint data);

    [LibraryImport(Ssl)]
    internal static partial nint SSL_get_ex_data(nint ssl, int index);

    [LibraryImport(Crypto)]
    internal static partial nint BIO_s_mem();

    [LibraryImport(Crypto)]
    internal static partial nint BIO_new(nint type);

    [LibraryImport(Crypto)]
    internal static partial int BIO_free(nint bio);

    [LibraryImport(Crypto)]
    internal static partial int BIO_read(nint bio, byte* buffer, int count);

    [LibraryImport(Crypto)]
    internal static partial int BIO_write(nint bio, byte* buffer, int count);

    [LibraryImport(Crypto)]
    private static partial long BIO_ctrl(nint bio, int cmd, long larg, nint parg);

    [LibraryImport(Crypto)]
    private static partial ulong ERR_get_error();

    [LibraryImport(Crypto)]
    private static partial void ERR_error_string_n(ulong error, byte* buffer, nuint length);

    [LibraryImport(Crypto)]
    internal static partial void ERR_clear_error();

    internal static int Pending(nint bio) => (int)BIO_ctrl(bio, BIO_CTRL_PENDING, 0, 0);

    /// <summary>
    /// A context for PSK sessions: TLS 1.2 and 1.3; TLS 1.2 offers the PSK suites (QEMU asks GnuTLS for
    /// ECDHE-PSK, DHE-PSK and PSK), TLS 1.3 its usual suites with the key as an external PSK. No session
    /// tickets: a resumed session would skip the identity check that tls-authz needs.
    /// </summary>
    internal static nint NewPskContext(bool server)
    {
        var ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
        if (ctx == 0)
        {
            throw new TlsException($"TLS handshake failed: {TakeError()}");
        }
        _ = SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, TLS1_2_VERSION, 0);
        _ = SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
        _ = SSL_CTX_set_num_tickets(ctx, 0);
        if (SSL_CTX_set_cipher_list(ctx, "kECDHEPSK:kDHEPSK:kPSK") != 1)
        {
            SSL_CTX_free(ctx);
            throw new TlsException($"TLS handshake failed: {TakeError()}");
        }
        return ctx;
    }

    /// <summary>OpenSSL's text for the oldest error queued on this thread (and clears the queue).</summary>
    internal static string TakeError()
    {
        var code = ERR_get_error();
        ERR_clear_error();
        if (code == 0)
        {
            return "The TLS connection was non-properly terminated.";
        }
        Span<byte> text = stackalloc byte[256];
        fixed (byte* p = text)
        {
            ERR_error_string_n(code, p, (nuint)text.Length);
        }
        var length = text.IndexOf((byte)0);
        return System.Text.Encoding.UTF8.GetString(text[..(length < 0 ? text.Length : length)]);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static nint NewMemoryBio()
    {
        var bio = BIO_new(BIO_s_mem());
        return bio != 0 ? bio : throw new TlsException($"TLS handshake failed: {TakeError()}");
    }
}
